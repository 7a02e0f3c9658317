"""picochat: train your own small ChatGPT, from raw text to a chat model in the browser."""
__version__ = "0.1.0"

"""The README's commands after a speedrun, in the README's order, as a newcomer types them: no --run anywhere.

    python tests/readme_flow.py PICOCHAT_HOME     # CI, after the demo speedrun (.ci/run)

tests/test_speedrun.py runs the same checks after the smoke speedrun. Each check runs the real command line in a
subprocess; the browser check opens the served UI in headless Chromium with the UI's default settings (a fresh
profile: nothing saved), sends the first example prompt the page offers, and waits for the streamed reply.
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def picochat(env, *argv, stdin=None, timeout=600):
    r = subprocess.run([sys.executable, "-m", "picochat", *argv], env=env, input=stdin, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, f"picochat {' '.join(argv)} exited {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def check_chat(env, run):
    """`picochat chat -p` and a short `picochat chat` session, both without --run."""
    r = picochat(env, "chat", "-p", "Who are you?", "--temperature", "0")
    assert f"run {run!r}" in r.stderr and r.stdout.strip(), (r.stdout, r.stderr)
    r = picochat(env, "chat", "--temperature", "0", stdin="Who are you?\n/exit\n")
    assert "trained on" in r.stdout and "try: " in r.stdout, r.stdout
    return r.stdout


def check_serve(env, run, context, browser=True):
    """`picochat serve` without --run: /info tells the UI the model's real limits, and (browser) the UI with its
    default settings gets a streamed reply to the first example it offers. Returns the reply's text."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "picochat", "serve", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, f"picochat serve exited {proc.returncode}: {proc.stdout.read()[-2000:]}"
            try:
                get_json(url + "/health", timeout=1)
                break
            except OSError:
                assert time.time() < deadline, "picochat serve did not come up in 120 s"
                time.sleep(0.5)
        info = get_json(url + "/info")
        assert info["model"] == f"picochat-{run}-rl" and info["context"] == context, info
        assert info["max_tokens"] == context and info["tool"] is True and info["examples"], info
        return browse(url, info) if browser else None
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def browse(url, info):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            page.wait_for_selector("button.example")  # the empty state offers the server's examples
            assert info["trained_on"] in page.text_content(".empty")
            page.click("#settings-btn")
            note = page.text_content("#server-limits")
            assert f"at most {info['max_tokens']} tokens per reply" in note, note
            assert int(page.input_value("#set-max-tokens")) == info["max_tokens"]  # the default 512, lowered
            page.click("#settings-cancel")
            page.click("button.example >> nth=0")
            page.wait_for_selector(".msg.assistant .bubble")
            page.wait_for_selector("#send", state="visible", timeout=120_000)  # the reply finished streaming
            reply = page.text_content(".msg.assistant .bubble")
            assert page.locator(".msg.assistant .error").count() == 0, reply
            assert reply.strip() and not errors, (reply, errors)
            return reply
        finally:
            browser.close()


def check_report_and_export(env):
    report = picochat(env, "report")
    assert "report card:" in report.stdout, report.stdout
    with tempfile.TemporaryDirectory() as tmp:
        r = picochat(env, "export", "--hf", str(Path(tmp) / "my-model"))
        assert "logits match picochat's" in r.stdout, r.stdout
        r = picochat(env, "export", "--stage", "sft", "--hf", str(Path(tmp) / "my-sft"), "--dtype", "bfloat16")
        assert "logits match picochat's" in r.stdout and "bfloat16" in r.stdout, r.stdout


def check_after_speedrun(env, run, context):
    """Everything the README tells a newcomer to run after the speedrun, in order. env: with PICOCHAT_HOME."""
    env = dict(env, NO_COLOR="1")
    out = {"chat": check_chat(env, run), "browser": check_serve(env, run, context)}
    check_report_and_export(env)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    home = Path(sys.argv[1])
    (run_dir,) = (home / "runs").iterdir()  # the speedrun's one run
    meta = json.loads(max((run_dir / "rl").glob("meta_*.json")).read_text())
    env = dict(os.environ, PICOCHAT_HOME=str(home))
    result = check_after_speedrun(env, run_dir.name, meta["config"]["sequence_len"])
    print(json.dumps({"readme_flow": "ok", "run": run_dir.name, "browser_reply": result["browser"]}))

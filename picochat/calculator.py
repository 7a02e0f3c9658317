"""The calculator tool: the chat model writes <|python_start|> expr <|python_end|> and sees the expression's value.

    evaluate_expression("12*3+4") -> "40"          (the live tool; None on any failure, never raises)
    format_value(arithmetic_value("12*3+4")) -> "40"  (the same text, for rendering training data)

Pure arithmetic (numbers, + - * / // % **, parentheses, unary signs) is computed in-process with the ast module;
any other expression ("'strawberry'.count('r')") runs in picochat.sandbox.run_python under small limits.
What holds true: whenever arithmetic_value(expr) returns v, evaluate_expression(expr) returns format_value(v), so
training data that renders tool results with format_value(arithmetic_value(expr)) shows exactly what the live
tool prints. evaluate_expression's text: ints as digits, integral floats as ints ("10/5" -> "2"), other floats
to 10 significant digits, strings without quotes, anything else as repr.
"""
import ast
import math

from picochat.sandbox import run_python

# the sandboxed runs: one expression's value, not a program's output
_EVAL_MEMORY_MB, _EVAL_MAX_PROCS, _EVAL_MAX_OUTPUT = 128, 4, 16_000

_MAX_INT_BITS = 10_000  # ~3,000 digits: below Python's 4,300-digit int->str limit, far above any answer
_MAX_EXPR_CHARS = 2000
_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b}


class _Unsupported(Exception):
    """Not pure arithmetic: hand it to the sandbox."""


def _arith(node):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _arith(node.operand)
        return -v if isinstance(node.op, ast.USub) else +v
    if isinstance(node, ast.BinOp):
        a, b = _arith(node.left), _arith(node.right)
        if isinstance(node.op, ast.Pow):
            if abs(b) > 1000 or (isinstance(a, int) and isinstance(b, int) and b > 0
                                 and a.bit_length() * b > _MAX_INT_BITS):
                raise ValueError("exponent too large")
            v = a ** b
        elif type(node.op) in _BINOPS:
            v = _BINOPS[type(node.op)](a, b)
        else:
            raise _Unsupported
        if isinstance(v, complex):
            raise ValueError("complex result")
        if isinstance(v, int) and v.bit_length() > _MAX_INT_BITS:
            raise ValueError("result too large")
        return v
    raise _Unsupported


def arithmetic_value(expr: str) -> int | float:
    """The value of a pure-arithmetic expression (numbers, + - * / // % **, parentheses, unary signs),
    computed in-process exactly as the calculator tool computes it: pure Python, never starts a process.
    When it returns v, evaluate_expression(expr) returns format_value(v); so training data that shows
    tool results renders them with format_value(arithmetic_value(expr)). Raises SyntaxError when expr
    does not parse, ValueError when it is not pure arithmetic (or empty, or over 2,000 characters) or
    its value is refused (an int over 10,000 bits, a huge exponent, a complex result), and
    ArithmeticError as Python would (1/0, a float overflow)."""
    text = expr.strip()
    if not text or len(text) > _MAX_EXPR_CHARS:
        raise ValueError(f"not an expression of 1 to {_MAX_EXPR_CHARS} characters")
    try:
        return _arith(ast.parse(text, mode="eval").body)
    except _Unsupported:
        raise ValueError(f"not pure arithmetic: {expr!r}") from None


def format_value(v) -> str:
    """How tool results are shown to the model (training data must render them the same way):
    ints as digits; floats with an integral value below 1e15 as ints ("10/5" -> "2"), other floats with
    10 significant digits ("0.1+0.2" -> "0.3", "1/3" -> "0.3333333333"); str without quotes
    ("'abc'.upper()" -> "ABC"); bool/None/containers as repr. Capped at 1,000 characters."""
    if isinstance(v, bool) or v is None:
        s = repr(v)
    elif isinstance(v, int):
        s = str(v)
    elif isinstance(v, float):
        if math.isfinite(v) and v.is_integer() and abs(v) < 1e15:
            s = str(int(v))
        else:
            s = f"{v:.10g}"
    elif isinstance(v, str):
        s = v
    else:
        s = repr(v)
    return s if len(s) <= 1000 else s[:1000] + "..."


_EVAL_PROGRAM = """import sys
v = eval(compile(sys.stdin.read(), "<expr>", "eval"), {})
print(repr(v) if type(v) in (int, float, bool, str, list, tuple, dict, set, type(None)) else "\\x00" + repr(v), end="")
"""


def evaluate_expression(expr: str, timeout: float = 3.0) -> str | None:
    """Evaluate one Python expression for the chat tool and return its text (see format_value), or None
    on any failure (syntax error, exception, not a single expression, too big, timeout). Pure arithmetic
    (numbers, + - * / // % **, parentheses, unary signs) is evaluated in-process with the ast module in
    microseconds; anything else ("'strawberry'.count('r')", "len('hello')") runs in run_python."""
    if not isinstance(expr, str):
        return None
    expr = expr.strip()
    if not expr or len(expr) > _MAX_EXPR_CHARS:
        return None
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    try:
        return format_value(_arith(tree.body))
    except _Unsupported:
        pass
    except (ArithmeticError, ValueError, TypeError, RecursionError):
        return None
    r = run_python(_EVAL_PROGRAM, timeout=timeout, memory_mb=_EVAL_MEMORY_MB, max_output=_EVAL_MAX_OUTPUT,
                   stdin=expr, max_procs=_EVAL_MAX_PROCS)
    if r.status != "ok":
        return None
    text = r.stdout
    if text.startswith("\x00"):  # an object with no literal form: show its repr
        return format_value(text[1:])
    try:
        return format_value(ast.literal_eval(text))
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return format_value(text)

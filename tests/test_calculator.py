"""The calculator tool: pure arithmetic in-process and fast, anything else through the sandbox, and the
in-process value rendered exactly as the live tool renders it."""
import time

import pytest

from picochat.calculator import arithmetic_value, evaluate_expression, format_value


def test_evaluate_expression_arithmetic_fast_path():
    assert evaluate_expression("12*3+4") == "40"
    assert evaluate_expression(" (2 + 3) * -4 ") == "-20"
    assert evaluate_expression("7/2") == "3.5"
    assert evaluate_expression("10/5") == "2"
    assert evaluate_expression("1/3") == "0.3333333333"
    assert evaluate_expression("0.1 + 0.2") == "0.3"
    assert evaluate_expression("7 // 2") == "3" and evaluate_expression("7 % 3") == "1"
    assert evaluate_expression("2**10") == "1024"
    assert evaluate_expression("2**0.5") == "1.414213562"
    assert evaluate_expression("1/0") is None
    assert evaluate_expression("2**10**10") is None  # refused, not computed
    assert evaluate_expression("12 +") is None
    assert evaluate_expression("") is None
    t = time.perf_counter()
    for _ in range(100):
        evaluate_expression("(1234 * 5678 - 91) / 7")
    assert (time.perf_counter() - t) / 100 < 1e-3  # in-process, no subprocess


def test_arithmetic_value_is_the_tools_fast_path():
    """Training data renders tool results with format_value(arithmetic_value(expr)): it must be the tool's text."""
    for expr in ("12*3+4", " (2 + 3) * -4 ", "7/2", "10/5", "1/3", "0.1 + 0.2", "7 // 2", "7 % 3", "2**0.5"):
        assert format_value(arithmetic_value(expr)) == evaluate_expression(expr)
    for expr in ("'abc'.upper()", "len('hello')", "2**10**10", "", "1+" * 1000 + "1"):
        with pytest.raises(ValueError):
            arithmetic_value(expr)
    with pytest.raises(ZeroDivisionError):
        arithmetic_value("1/0")
    with pytest.raises(SyntaxError):
        arithmetic_value("12 +")


def test_evaluate_expression_in_the_sandbox():
    assert evaluate_expression("'strawberry'.count('r')") == "3"
    assert evaluate_expression("len('hello')") == "5"
    assert evaluate_expression("'abc'.upper()") == "ABC"
    assert evaluate_expression("sorted([3, 1, 2])") == "[1, 2, 3]"
    assert evaluate_expression("max(3, 9) > 4") == "True"
    assert evaluate_expression("x = 3") is None  # statements are not expressions
    assert evaluate_expression("__import__('os').system('true')") is None  # the guard refuses
    assert evaluate_expression("[0] * 10**10") is None  # memory limit

"""Sandbox latency: run_python on a trivial program (process start + namespaces + cleanup), 8 threads at
once, and evaluate_expression on arithmetic (in-process ast fast path) and on a string method (sandbox).

    python bench/sandbox.py --runs 20

Prints one JSON line (times in milliseconds).
"""
import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from picochat.calculator import evaluate_expression
from picochat.sandbox import run_python, sandbox_info

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--runs", type=int, default=20)
args = p.parse_args()


def timed_ms(fn, n):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return times


def summary(times):
    times = sorted(times)
    return {"median": round(statistics.median(times), 3), "p90": round(times[int(0.9 * (len(times) - 1))], 3)}


info = sandbox_info()  # the one-time probe is not part of the per-call latency
run_python("print(1)")  # warm the page cache
assert run_python("print(1)").stdout == "1\n"
trivial = timed_ms(lambda: run_python("print(1)"), args.runs)
numeric = timed_ms(lambda: run_python("import math, re, collections\nprint(math.factorial(20))"), args.runs)
t = time.perf_counter()
with ThreadPoolExecutor(8) as ex:
    results = list(ex.map(lambda i: run_python(f"print({i})"), range(8 * args.runs)))
parallel_s = time.perf_counter() - t
assert all(r.stdout == f"{i}\n" for i, r in enumerate(results))
assert evaluate_expression("(1234 * 5678 - 91) / 7") == "1000937.286"
fast = timed_ms(lambda: evaluate_expression("(1234 * 5678 - 91) / 7"), 1000)
slow = timed_ms(lambda: evaluate_expression("'strawberry'.count('r')"), args.runs)
print(json.dumps({
    "bench": "sandbox",
    "isolation": results[0].isolation,
    "run_python_trivial_ms": summary(trivial),
    "run_python_imports_ms": summary(numeric),
    "run_python_8_threads_runs_per_s": round(len(results) / parallel_s, 1),
    "evaluate_expression_arith_us": summary([t * 1000 for t in fast]),
    "evaluate_expression_sandboxed_ms": summary(slow),
    "runs": args.runs,
}))

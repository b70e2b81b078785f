"""`make bench`: run every benchmark under bench/ and print their tables, one after another."""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHMARKS = ["grading.py", "forced_exit_overhead.py", "sft_throughput.py", "grpo_step.py", "startup.py", "memory.py"]

if __name__ == "__main__":
    failed = []
    for name in BENCHMARKS:
        result = subprocess.run([sys.executable, os.path.join(HERE, name)], capture_output=True, text=True)
        tables = result.stdout[result.stdout.find("\nbench/"):] if "\nbench/" in result.stdout else result.stdout
        print(tables.rstrip())
        if result.returncode != 0:
            failed.append(name)
            print(result.stderr[-2000:])
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")

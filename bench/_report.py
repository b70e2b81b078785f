"""Shared by the benchmarks: the machine they ran on, and a plain table."""
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def machine() -> str:
    import torch

    from engine import on_gpu
    if on_gpu():
        return f"{torch.cuda.get_device_name()} ({torch.cuda.device_count()} GPU)"
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def print_table(title: str, rows: list[dict]) -> None:
    columns = list(rows[0])
    cells = [columns] + [[f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    print(f"\n{title}  [machine: {machine()}]")
    for i, row in enumerate(cells):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))

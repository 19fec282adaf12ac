"""Merge main-job CSVs into one Markdown table (per budget, rows by accuracy, accuracy per type):
    python experiments/results/arr_coc_host_diag/merge_tables.py /tmp/ach6/r1/r1.csv /tmp/ach6/r2/r2.csv
"""
import csv, sys
rows = {}
for p in sys.argv[1:]:
    for r in csv.DictReader([l for l in open(p) if not l.startswith("#")]):
        rows[(r["allocator"], int(r["budget"]))] = r
budgets = sorted({k for _, k in rows}, reverse=True)
print("| allocator | budget | accuracy | shape | colour | side | nearest | compare | count | exists | recall | tokens | alloc ms |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for k in budgets:
    rs = sorted([r for (a, b), r in rows.items() if b == k], key=lambda r: -float(r["accuracy"]))
    for r in rs:
        f = lambda c: f"{float(r[c]):.3f}"
        print(f"| {r['allocator']} | {k} | {f('accuracy')} | " + " | ".join(f('acc_' + t) for t in ["shape","colour","side","nearest","compare","count","exists"]) + f" | {f('recall')} | {float(r['tokens']):.1f} | {float(r['alloc_ms']):.2f} |")

"""The README's headline table from the main job's CSV: python experiments/results/headline_table.py experiments/results/main.csv"""
import csv, statistics as st, sys
LAYERS = {"arr_coc_host_llm_trained": "2", "arr_coc_host_llm_k2": "2", "arr_coc_host_trained": "1 (its prior)",
          "fastv": "2", "sparsevlm": "1 (then fewer)", "arr_coc_host_llm": "1", "arr_coc_host": "1 (its prior)", "full": "6 (all)", "oracle": "0",
          "arr_coc_host_llm_price": "2", "no_visual_after_layer1": "2"}
NOTE = {"oracle": "oracle (ground-truth relevant cells first)", "full": "full (256 tokens)",
        "arr_coc_host_llm": "arr_coc_host_llm (greedy CMI after layer 0, training-free)",
        "arr_coc_host": "arr_coc_host (greedy CMI before the LLM, layer-0 prior, training-free)",
        "arr_coc_host_llm_trained": "arr_coc_host_llm_trained (greedy CMI after layer 1, FastV's reader, + a term trained on relevance masks)",
        "arr_coc_host_llm_price": "arr_coc_host_llm_price (the same greedy, FastV's place and reader, price 4 nats: the budget is a cap)",
        "no_visual_after_layer1": "no visual slot after layer 1 (a control: what layers 0-1 already read)",
        "arr_coc_host_llm_k2": "arr_coc_host_llm after layer 1 (FastV's place and reader, training-free)",
        "arr_coc_host_trained": "arr_coc_host_trained (arr_coc_host + a term trained on relevance masks)",
        "arr_coc_host_trained_distill": "arr_coc_host_trained, distilled (a term distilled from layer 0's attention; reads no LLM layer)",
        "arr_coc": "arr_coc (exact greedy CMI, trained)", "arr_coc_adapter": "arr_coc_adapter (greedy on a shortlist, trained)",
        "cdpruner": "cdpruner (released sign)", "cdpruner_paper_sign": "cdpruner (paper's sign)",
        "tome": "tome (merging inside the ViT)", "sparsevlm": "sparsevlm (text raters, recycling)", "fastv": "fastv (K = 2)"}
REFERENCES = ("full", "oracle", "no_visual_after_layer1")  # references first, then by accuracy at 8 tokens
lines = [l for l in open(sys.argv[1]) if not l.startswith("#")]
rows = list(csv.DictReader(lines)); acc = {}
for r in rows: acc.setdefault((r["allocator"], int(r["budget"])), []).append(float(r["accuracy"]))
budgets = sorted({k for _, k in acc}, reverse=True)
names = sorted({a for a, _ in acc}, key=lambda a: (a not in REFERENCES, -st.mean(acc[(a, 8)])))
for a in names:
    cells = []
    for k in budgets:
        v = acc[(a, k)]; m = st.mean(v)
        cells.append(f"{m:.3f}" + (f" ± {st.stdev(v):.3f}" if len(v) > 1 and st.stdev(v) > 0 and a != "random" or (a == "random" and len(v) > 1) else ""))
    print(f"| {NOTE.get(a, a)} | {LAYERS.get(a, '0')} | " + " | ".join(cells) + " |")

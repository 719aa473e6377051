"""Score the answers a bench.py JSON recorded again, with the harness's current scoring, in place.

The JSON keeps every greedy answer (suite rows' "answer", quality cells' "passkey_answers"), and the
expected answers follow from the task, seed, depth and length, so a change of scoring needs no new
run. Written for 2026-11-29's: answers matched as whole items, where a substring match had counted
"98443490" as the number 9844349 and "wwizard" as the word wizard. Prints every score that changes.

    python tools/rescore.py docs/bench/suite_cpu_4k_all.json ...   # --dry-run: print only
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.eval.cells import passkey_fields  # noqa: E402
from engine.eval.haystack import make_haystack  # noqa: E402
from engine.eval.tasks import make_task  # noqa: E402
from weights.load import model_tokenizer  # noqa: E402


def rescore(results: dict, tok, log) -> int:
    """Rescore `results` in place -> how many scores changed."""
    changed, tasks = 0, {}
    for r in results.get("suite") or []:
        key = (r["task"], r["ctx"], r["seed"])
        task = tasks.get(key) or tasks.setdefault(key, make_task(r["task"], tok, r["ctx"], r["seed"]))
        score = task.score(r["answer"])
        if score != r["score"]:
            log(f"  {r['engine']} {r['policy']} @ {r['fraction']} {r['task']} seed {r['seed']}: "
                f"{r['answer'][:40]!r}, expected {task.answers}: {r['score']} -> {score}")
            r["score"], changed = score, changed + 1
    meta = results["meta"]
    for row in results.get("cells", []) + results.get("sweep", []):
        q = row.get("quality") or {}
        if "passkey_answers" not in q:
            continue
        n = row.get("prompt_tokens") or next(c["prompt_tokens"] for c in results["cells"] if c["ctx"] == row["ctx"])
        keys = [make_haystack(tok, n, depth=d, seed=s) for s in range(meta["seeds"]) for d in meta["depths"]]
        found = [h.found(a) for h, a in zip(keys, q["passkey_answers"])]
        if sum(found) != q["passkey_found"]:
            log(f"  {row['engine']} {row['policy']} ctx {row['ctx']}: pass key {q['passkey_found']} -> {sum(found)}")
            q.update(passkey_fields(found, q["passkey_answers"]))
            changed += 1
    return changed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="+", help="bench.py --json files")
    p.add_argument("--dry-run", action="store_true", help="print the changes, write nothing")
    a = p.parse_args()
    tok = model_tokenizer(None)  # the default model's: every recorded run used it
    for path in a.json:
        with open(path) as f:
            results = json.load(f)
        print(path)
        if not isinstance(results, dict) or "meta" not in results:
            print("  not a bench.py JSON: skipped")
            continue
        n = rescore(results, tok, print)
        if n and not a.dry_run:
            with open(path, "w") as f:
                json.dump(results, f, indent=1)
        print(f"  {n} changed")


if __name__ == "__main__":
    main()

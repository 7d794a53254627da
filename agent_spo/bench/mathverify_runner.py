"""Run HuggingFace math-verify on (gold, response) pairs, for `agent-spo bench verify`.

This file runs under the Python of a *separate* environment that has math-verify
installed (`python -m venv .venv-mathverify && .venv-mathverify/bin/pip install
'math-verify[antlr4_13_2]'`); it imports nothing from agent_spo. It reads
{"pairs": [[gold, response], ...], "workers": N, "timeout_s": T} as JSON on stdin and
writes one JSON object per pair on stdout: {"i", "correct", "status", "elapsed_s"}.

The adapter is the one verl uses (verl/utils/reward_score/math_verify.py): the gold is
wrapped in \\boxed{} and parsed with LatexExtractionConfig, the response with
ExprExtractionConfig and LatexExtractionConfig, then `verify(gold, pred)`. math-verify's
own signal-based timeouts (5 s parse, 5 s verify) stay on, since each call runs in a
worker's main thread; each call also gets a hard outer wall clock (a kill), which counts
as status "timeout" and verdict False, as a reward function would score it.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import sys
import threading
import time


def _worker(conn) -> None:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    gold_config = [LatexExtractionConfig()]
    pred_config = [ExprExtractionConfig(), LatexExtractionConfig()]
    parse("\\boxed{1}", gold_config)  # warm the parser before the clock starts
    conn.send("ready")
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        gold, response = message
        start = time.perf_counter()
        try:
            gold_parsed = parse("\\boxed{" + gold + "}", gold_config)
            pred_parsed = parse(response, pred_config)
            correct = bool(verify(gold_parsed, pred_parsed))
            status = "correct" if correct else "incorrect"
        except Exception as e:  # noqa: BLE001
            correct, status = False, f"error: {type(e).__name__}"
        conn.send((correct, status, time.perf_counter() - start))


class _Slot:
    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self.start()

    def start(self) -> None:
        self.conn, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_worker, args=(child,), daemon=True)
        self.proc.start()
        child.close()
        self.conn.poll(300)
        self.conn.recv()

    def run(self, pair, timeout_s: float):
        self.conn.send(pair)
        start = time.perf_counter()
        if self.conn.poll(timeout_s):
            return self.conn.recv()
        self.proc.kill()
        self.proc.join()
        self.start()
        return False, "timeout", time.perf_counter() - start


def main() -> None:
    request = json.load(sys.stdin)
    pairs = request["pairs"]
    timeout_s = float(request.get("timeout_s", 10.0))
    ctx = mp.get_context("fork")  # this script is single-threaded until the slots exist
    slots = [_Slot(ctx) for _ in range(int(request.get("workers", 1)))]
    results: list = [None] * len(pairs)
    lock = threading.Lock()
    next_index = [0]

    def drain(slot: _Slot) -> None:
        while True:
            with lock:
                i = next_index[0]
                next_index[0] += 1
            if i >= len(pairs):
                return
            results[i] = slot.run(tuple(pairs[i]), timeout_s)

    wall = time.perf_counter()
    threads = [threading.Thread(target=drain, args=(s,)) for s in slots]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - wall
    for i, (correct, status, elapsed) in enumerate(results):
        print(json.dumps({"i": i, "correct": correct, "status": status, "elapsed_s": elapsed}))
    print(json.dumps({"wall_s": wall}))
    for s in slots:
        s.conn.send(None)
        s.proc.join(1)
        if s.proc.is_alive():
            s.proc.kill()


if __name__ == "__main__":
    main()

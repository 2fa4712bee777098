"""llama.cpp row of bench/decode.py, run by the Python of the llama.cpp environment (_llamacpp_env.py).

Reads a JSON job on stdin ({gguf, prompt_ids, tokens, threads, repeats}); prints one JSON result line.
Greedy decode written out here (argmax of the last logits, feed it back) so that the loop does exactly
what our engine's does: one prefill of the prompt ids, then one single-token decode per new token,
EOS ignored. Imports nothing of fbserve.
"""
from __future__ import annotations

import json
import resource
import statistics
import sys
import time

import numpy as np
import llama_cpp


def greedy(llm: llama_cpp.Llama, prompt_ids: list[int], tokens: int) -> dict:
    """One generation; times as in decode.py: TTFT = prefill + first argmax, decode = tokens 2..N."""
    n_vocab = llm.n_vocab()

    def argmax() -> int:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        return int(logits.argmax())

    llm.reset()
    llama_cpp.llama_perf_context_reset(llm.ctx)
    start = time.perf_counter()
    llm.eval(prompt_ids)
    out = [argmax()]
    stamps = [time.perf_counter()]
    while len(out) < tokens:
        llm.eval([out[-1]])
        out.append(argmax())
        stamps.append(time.perf_counter())
    perf = llama_cpp.llama_perf_context(llm.ctx)
    decode_s = stamps[-1] - stamps[0]
    return {
        "ttft_s": stamps[0] - start,
        "decode_tok_s": (len(out) - 1) / decode_s if decode_s > 0 else None,
        "token_ids": out,
        # llama.cpp's own counters (its eval time excludes this loop's Python and argmax).
        "internal_prefill_ms": perf.t_p_eval_ms, "internal_eval_ms": perf.t_eval_ms,
        "internal_n_eval": perf.n_eval,
    }


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:")) / 1024


def main() -> None:
    job = json.loads(sys.stdin.read())
    prompt_ids, tokens = job["prompt_ids"], job["tokens"]
    llm = llama_cpp.Llama(model_path=job["gguf"], n_ctx=len(prompt_ids) + tokens + 16, n_batch=512,
                          n_threads=job["threads"], n_threads_batch=job["threads"], seed=0, verbose=False)
    greedy(llm, prompt_ids, min(8, tokens))  # warm-up: page in weights, size buffers
    runs = [greedy(llm, prompt_ids, tokens) for _ in range(job["repeats"])]
    best = runs[-1]
    internal = best["internal_eval_ms"]
    print(json.dumps({
        "decode_tok_s_runs": [r["decode_tok_s"] for r in runs],
        "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
        "ttft_s": statistics.median(r["ttft_s"] for r in runs),
        "token_ids": best["token_ids"],
        "internal_decode_tok_s": best["internal_n_eval"] / (internal / 1e3) if internal else None,
        "threads": job["threads"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_end_mb": rss_mb(),
        "version": llama_cpp.__version__,
    }))


if __name__ == "__main__":
    main()

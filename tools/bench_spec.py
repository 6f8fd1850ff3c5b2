"""MTP speculative decoding vs plain decoding, side by side in one run.

    .venv/bin/python tools/bench_spec.py [--model models/pdserve-mini] [--batches 1,16] [--k 1,2] [--output-len 128]
        [--sets 4]

Prompts are 64-token slices of held-out standard-library files (text the bundled
model was not trained on). A batch size ``b`` runs ``--sets`` different sets of ``b`` prompts
one after the other (at batch 1 a single prompt decides too much: the bundled model falls into
a loop on some prompts, where drafting is easy or hard for the whole run), and its rate is
all their tokens over all their time. For each batch size: one unrecorded run of every engine first
(a server is warm when it serves: the first run pays one-off costs, ~0.85x the rate of the next ones
with MTP at batch 1; bundled model in bf16 on a 2-core AMD EPYC with AVX512-BF16, no AMX), then decode
tokens/s without MTP and with MTP for each k, engines alternated run after run, --repeats times. The speed-up printed is the median of each repeat's ratio to the run without
MTP just before it (a ratio of neighbours: the machine's speed drifts by more than the effect between
repeats), with its range; the rates are medians. Acceptance per draft position and how many greedy
sequences are identical to plain decoding are printed (identical in fp32; in bf16 the verify pass and
the one-token decode round differently, so a near-tie can flip).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _prompts(tokenizer, n: int, prompt_len: int) -> list[list[int]]:
    from engine.checkpoint.tokenizer import default_corpus_files

    files = default_corpus_files()[25::50]  # between the held-out files of tools/train_tiny.py
    prompts = []
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            ids = tokenizer.encode(fh.read(40000))
        prompts.extend(ids[i:i + prompt_len] for i in range(0, len(ids) - prompt_len + 1, 8 * prompt_len))
    if len(prompts) < n:
        raise SystemExit(f"only {len(prompts)} prompts of {prompt_len} tokens in the held-out files")
    return prompts[::len(prompts) // n][:n]  # spread over the files


def _run(llm, prompt_sets, output_len: int) -> tuple[float, list[list[int]]]:
    """Each set of prompts as one batch, one set after another: tokens/s over all, every output."""
    from engine import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    t0 = time.perf_counter()
    outs = [o for prompts in prompt_sets for o in llm.generate(prompts, params)]
    elapsed = time.perf_counter() - t0
    return len(outs) * output_len / elapsed, [o.outputs[0].token_ids for o in outs]


def main() -> None:
    from engine import LLM
    from engine.args import default_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=default_model())
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--k", default="1,2")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--sets", type=int, default=4, help="prompt sets per batch size, run one after the other")
    ap.add_argument("--disable-by-batch-size", type=int, default=0,
                    help="the engines' speculative_disable_by_batch_size (default 0: draft at every batch size)")
    ap.add_argument("--dtype", default="auto", help="auto: bf16 where this machine runs it fast, else fp32")
    args = ap.parse_args()
    ks = [int(k) for k in args.k.split(",")]
    engines = {0: LLM(args.model, dtype=args.dtype)}
    for k in ks:
        engines[k] = LLM(args.model, dtype=args.dtype, speculative="mtp", num_speculative_tokens=k,
                         speculative_disable_by_batch_size=args.disable_by_batch_size)
    dtype = engines[0].engine.executor.runner.dtype_choice.dtype
    print(f"model {args.model}, {dtype}, torch threads {torch.get_num_threads()}, "
          f"prompt {args.prompt_len} tokens, {args.output_len} generated (greedy)")
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = _prompts(engines[0].tokenizer, batch * args.sets, args.prompt_len)
        prompt_sets = [prompts[i::args.sets] for i in range(args.sets)]
        rates: dict[int, list[float]] = {k: [] for k in engines}
        outputs = {}
        for llm in engines.values():  # warm-up, not recorded
            _run(llm, prompt_sets[:1], args.output_len)
        before = {k: engines[k].engine.stats() for k in ks}
        for _ in range(args.repeats):  # alternate so every engine sees the same machine noise
            for k, llm in engines.items():
                rate, outputs[k] = _run(llm, prompt_sets, args.output_len)
                rates[k].append(rate)
        base = statistics.median(rates[0])
        print(f"\nbatch {batch} ({args.sets} sets of {batch} prompts): without MTP {base:7.1f} tok/s")
        for k in ks:
            ratios = [r / r0 for r, r0 in zip(rates[k], rates[0])]
            same = sum(a == b for a, b in zip(outputs[k], outputs[0]))
            now, was = engines[k].engine.stats(), before[k]
            drafts = now.spec_drafts - was.spec_drafts
            per_pos = [(a - b) / drafts for a, b in zip(now.spec_accepted_per_position, was.spec_accepted_per_position)]
            mean_len = 1 + (now.spec_accepted_tokens - was.spec_accepted_tokens) / drafts
            print(f"  MTP k={k}: {statistics.median(rates[k]):7.1f} tok/s  ({statistics.median(ratios):.2f}x, "
                  f"{min(ratios):.2f}-{max(ratios):.2f}x over {len(ratios)} repeats)  "
                  f"acceptance by position {', '.join(f'{a:.2f}' for a in per_pos)}  "
                  f"tokens/step {mean_len:.2f}  greedy sequences identical {same}/{len(prompts)}")


if __name__ == "__main__":
    main()

"""TRL's GRPOTrainer, unpatched vs ``lenkernels.integrations.trl.patched()``: time per training step
and peak memory, on a tiny random Qwen2 with a real-sized vocabulary (no download: the model and a
word-level tokenizer are built here).

    python -m lenkernels.bench.trl_grpo [--vocab 65536] [--steps 3] [--json PATH]

Each configuration runs in a fresh process (so the peak resident memory is its own): it builds the
trainer, trains one warm-up step, then ``--steps`` steps. Reported: seconds per step (median of
TRL's own ``step_time`` metric over the timed steps: generation, the old-policy forward and the
training step) and the growth of the process's peak resident set during training (``ru_maxrss``
after training minus before it); on a CUDA machine the peak is ``torch.cuda.max_memory_allocated``.

``tiny_grpo_trainer`` is also what the integration tests train (tests/test_integration_trl*.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile


def tiny_grpo_trainer(workdir: str, *, vocab: int = 64, hidden: int = 32, layers: int = 1, prompts: int = 8,
                      prompt_words: int = 4, **config):  # fmt: skip
    """A TRL ``GRPOTrainer`` on a random Qwen2 (``vocab`` tokens ``w0..``, ``hidden`` wide, ``layers``
    deep) saved under ``workdir`` and loaded from there (as TRL loads a reference model), with a
    word-level tokenizer and a length-penalised rule reward (count of ``w1`` minus 0.1 per word).
    ``config`` overrides the ``GRPOConfig`` defaults below (CPU, no logging backends, no saving)."""
    import torch
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    words = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"w{i}": i + 3 for i in range(vocab - 3)}}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")
    n_words = min(vocab - 3, 61)
    data = Dataset.from_dict(
        {"prompt": [" ".join(f"w{(7 * i + j) % n_words}" for j in range(prompt_words)) for i in range(prompts)]}
    )

    def reward(completions, **kwargs):
        return [c.split().count("w1") - 0.1 * len(c.split()) for c in completions]

    torch.manual_seed(0)
    model_config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                               num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, pad_token_id=0,
                               bos_token_id=1, eos_token_id=2)  # fmt: skip
    model_dir = os.path.join(workdir, "model")
    Qwen2ForCausalLM(model_config).save_pretrained(model_dir)
    args = dict(output_dir=os.path.join(workdir, "out"), use_cpu=not torch.cuda.is_available(), report_to=[],
                max_steps=2, per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
                logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True)  # fmt: skip
    return GRPOTrainer(model=model_dir, reward_funcs=reward, args=GRPOConfig(**{**args, **config}),
                       train_dataset=data, processing_class=tok)  # fmt: skip


def _child(patch: bool, vocab: int, steps: int) -> dict:
    import torch

    from lenkernels.integrations import trl as lk_trl

    with tempfile.TemporaryDirectory() as workdir:
        trainer = tiny_grpo_trainer(
            workdir, vocab=vocab, hidden=64, layers=2, prompts=64, prompt_words=16, max_steps=steps + 1,
            per_device_train_batch_size=8, num_generations=8, max_completion_length=64, loss_type="dapo", beta=0.0,
            learning_rate=1e-5,
        )  # fmt: skip
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        with lk_trl.patched() if patch else contextlib.nullcontext():
            trainer.train()
        after = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        times = [h["step_time"] for h in trainer.state.log_history if "step_time" in h][1:]  # first: warm-up
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"patched": patch, "vocab": vocab, "steps": len(times), "step_s": statistics.median(times),
            "peak_growth_mib": max(0, after - before) / 2**20, "memory": "cuda allocated" if cuda else "cpu max rss",
            "losses": losses}  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lenkernels.bench.trl_grpo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the two rows here")
    parser.add_argument("--child", choices=("patched", "unpatched"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child == "patched", args.vocab, args.steps)))
        return
    rows = []
    for which in ("unpatched", "patched"):
        cmd = [sys.executable, "-m", "lenkernels.bench.trl_grpo", "--child", which, "--vocab", str(args.vocab),
               "--steps", str(args.steps)]  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    base = rows[0]
    print("| TRL GRPOTrainer step | s/step | peak memory growth (MiB) |")
    print("|---|---|---|")
    for r in rows:
        name = "lenkernels patch()" if r["patched"] else "TRL 1.16"
        print(f"| {name}, V={r['vocab']} | {r['step_s']:.3f} ({base['step_s'] / r['step_s']:.2f}x) "
              f"| {r['peak_growth_mib']:.0f} |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"what": "TRL GRPOTrainer step, unpatched vs lenkernels patch()", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

"""The ``aligner`` command: ``aligner train|generate|score|export-hf|fetch-model|convert|plan ...``.

Each subcommand parses its own arguments here and calls one library function, so everything the
CLI does is also importable. Errors the user can fix print one line and exit non-zero.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

# Algorithm name -> module whose main(argv) runs it (the same as examples/train_<name>.py).
TRAINERS = {"sft": "aligner.trainers.sft", **{name: "aligner.trainers.preference"
                                              for name in ("rm", "dpo", "kto", "cpo", "orpo", "simpo")},
            **{name: "aligner.trainers.online" for name in ("ppo", "grpo", "rloo", "reinforce")},
            "self_rewarding": "aligner.trainers.self_rewarding"}


def _fetch_model(argv: list[str]) -> int:
    from aligner.models.fetch import KNOWN_MODELS, fetch_model

    p = argparse.ArgumentParser(prog="aligner fetch-model", description="Download an embedded model and "
                                "convert it to a Hugging Face directory; prints the directory.")
    p.add_argument("name", choices=sorted(KNOWN_MODELS))
    p.add_argument("--cache-dir", default=None, help="where models are kept (default: $ALIGNER_CACHE or ~/.cache/aligner)")
    p.add_argument("--force", action="store_true", help="convert again even if the directory exists")
    args = p.parse_args(argv)
    print(fetch_model(args.name, cache_dir=args.cache_dir, force=args.force))
    return 0


def _convert(argv: list[str]) -> int:
    from aligner.models.gguf import convert_gguf

    p = argparse.ArgumentParser(prog="aligner convert", description="Convert a GGUF file (dequantized) into a "
                                "Hugging Face directory: config.json, model.safetensors, tokenizer.json.")
    p.add_argument("gguf", help="path to a .gguf file of a Llama-family model")
    p.add_argument("output", help="directory to write (must not exist, or be empty)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args(argv)
    print(convert_gguf(args.gguf, args.output, dtype=args.dtype))
    return 0


def _train(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in TRAINERS:
        print(f"usage: aligner train {{{','.join(TRAINERS)}}} [CONFIG.yaml] [key=value ...]\n\n"
              f"Runs the algorithm's trainer (also under torchrun / srun); overrides use Hydra's key=value "
              f"syntax, see docs/configuration.md.")
        if argv and argv[0] not in ("-h", "--help"):
            raise ValueError(f"unknown algorithm '{argv[0]}'; choose one of {', '.join(TRAINERS)}")
        return 0
    module = importlib.import_module(TRAINERS[argv[0]])
    if module.__name__ in ("aligner.trainers.preference", "aligner.trainers.online"):  # one loop, several algorithms
        return module.main(argv[1:], algorithm=argv[0])
    return module.main(argv[1:])


def _export_hf(argv: list[str]) -> int:
    from aligner.checkpoint import export_hf

    p = argparse.ArgumentParser(prog="aligner export-hf", description="Write a training checkpoint as a Hugging "
                                "Face directory (config.json, safetensors, tokenizer) that transformers loads.")
    p.add_argument("checkpoint", help="a checkpoint directory, e.g. outputs/checkpoints/step_100")
    p.add_argument("output", help="directory to write")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written weights (default: as trained)")
    args = p.parse_args(argv)
    print(export_hf(args.checkpoint, args.output, dtype=args.dtype))
    return 0


def _generate(argv: list[str]) -> int:
    from aligner.generation.cli import main as generate_main

    return generate_main(argv)


def _score(argv: list[str]) -> int:
    from aligner.trainers.score import main as score_main

    return score_main(argv)


def _plan(argv: list[str]) -> int:
    from aligner.parallel.plan import plan_main

    return plan_main(argv)


COMMANDS = {
    "train": (_train, "train with an algorithm: aligner train sft [CONFIG.yaml] [key=value ...]"),
    "generate": (_generate, "sample responses for a prompts file: aligner generate data.prompts=F.jsonl output=OUT.jsonl"),
    "score": (_score, "add a reward model's score to each record: aligner score RM_DIR data.jsonl [-o OUT.jsonl]"),
    "export-hf": (_export_hf, "export a training checkpoint as a Hugging Face directory"),
    "fetch-model": (_fetch_model, "download and convert an embedded model (smollm2-135m-instruct)"),
    "convert": (_convert, "convert a GGUF file into a Hugging Face checkpoint directory"),
    "plan": (_plan, "check a parallel layout and print per-GPU memory and step FLOPs, without starting processes"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: aligner <command> [args]\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<12} {help_text}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\naligner: unknown command '{argv[0]}'", file=sys.stderr)
            return 2
        return 0
    handler, _ = COMMANDS[argv[0]]
    try:
        return handler(argv[1:])
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        # Input the user can fix: one line naming what was wrong, no traceback wall. Every rank of a
        # multi-process job sees the same error; rank 0 says it.
        if os.environ.get("RANK", "0") == "0":
            print(f"aligner {argv[0]}: error: {e}", file=sys.stderr)
        return 1


def run(argv: list[str] | None = None) -> NoReturn:
    """The process entry (the ``aligner`` console script, ``examples/*.py``): :func:`main`, then end the process
    without interpreter shutdown once torch.distributed ran (see ``aligner/parallel/process_exit.py``)."""
    from aligner.parallel.process_exit import exit_after

    exit_after(main, argv)


if __name__ == "__main__":
    run()

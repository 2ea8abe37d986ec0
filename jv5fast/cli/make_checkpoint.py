"""``jv5fast make-checkpoint DIR [--family nano|small] [--size tiny|full] [--seed N]``.

A checkpoint folder in the released layout whose weights are RANDOM (jv5fast.testing.write_checkpoint with
the real tokenizers rebuilt from quicktok-v1), offline, for trying the commands and testing pipelines. Its
README.txt and the config field ``jv5fast_random_weights`` say the vectors are meaningless. Nothing is
overwritten: DIR must be new or empty, and a failure leaves it as it was.
"""
from __future__ import annotations

import json
import os
import sys

from .args import HelpWithDefaults, checked
from .messages import CLIError, jv5fast_version, names

_HUB_IDS = {"nano": "jinaai/jina-embeddings-v5-text-nano", "small": "jinaai/jina-embeddings-v5-text-small"}
_seed = checked(int, lambda n: 0 <= n < 2**32, "an integer in 0..4294967295")


def register(sub):
    m = sub.add_parser("make-checkpoint", help="write a checkpoint with RANDOM weights, offline (to try the "
                       "commands and to test; its vectors are meaningless)", formatter_class=HelpWithDefaults,
                       description="Write a checkpoint folder in the released layout (config.json, bf16 "
                       "safetensors, the four task adapters, the real tokenizer) whose weights are RANDOM, drawn "
                       "from --seed, with no download. Every command takes it as --model, but its embeddings are "
                       "MEANINGLESS: use it to try jv5fast and to test pipelines offline, never to compare texts. "
                       "The folder's README.txt and the config field jv5fast_random_weights say so. Needs the "
                       "quicktok-v1 package for the tokenizers.")
    m.add_argument("dir", metavar="DIR", help="folder to write; it must not exist, or be empty (nothing is "
                   "overwritten)")
    m.add_argument("--family", default="nano", choices=("nano", "small"), help="architecture: nano (EuroBERT, "
                   "Llama-3 tokenizer) or small (Qwen3 tokenizer and backbone)")
    m.add_argument("--size", default="tiny", choices=("tiny", "full"), help="tiny: 2 layers, 64-d, a few MB, "
                   "seconds; full: the released shapes (hundreds of MB to ~1.2 GB)")
    m.add_argument("--seed", type=_seed, default=0, help="random seed; the same seed writes the same weights")


_RANDOM_README = """RANDOM WEIGHTS - THIS IS NOT A TRAINED MODEL
============================================

This folder was written by `jv5fast make-checkpoint` (jv5fast {version}):
family {family}, size {size}, seed {seed}.

Its layout, shapes and tokenizer are those of {hub_id}, but every weight is a
random number drawn from the seed. The embeddings it produces are MEANINGLESS:
similar texts do not get similar vectors. Use it to try the jv5fast commands
and to test pipelines offline; never to search, rank, cluster or compare real
texts. config.json carries "jv5fast_random_weights": true to say the same.

For real embeddings, use the released model: --model {hub_id}
"""


def run(a):
    """Write the checkpoint in a hidden folder inside DIR, then rename its files into DIR (renames within one
    folder: a mount point works, and a failure leaves DIR as it was, removed again if this command made it)."""
    import shutil
    import tempfile
    out = a.dir
    if os.path.lexists(out):
        if not os.path.isdir(out):
            raise CLIError(f"DIR {out} exists and is not a folder; give a new folder's name")
        try:
            held = os.listdir(out)
        except OSError as e:
            raise CLIError(f"cannot read DIR {out}: {e.strerror or e}") from None
        if held:
            raise CLIError(f"DIR {out} exists and is not empty (it holds {names(sorted(held), 5)}); "
                           f"make-checkpoint never overwrites or deletes anything: give a new or empty folder")
    else:
        parent = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(parent):
            raise CLIError(f"DIR {out}: folder {parent} does not exist")
    try:
        import quicktok  # noqa: F401  (the tokenizers are rebuilt from its vocabularies)
    except ImportError:
        raise CLIError("quicktok-v1 is not installed; make-checkpoint rebuilds the real tokenizers from its "
                       "vocabularies: pip install quicktok-v1") from None
    from ..testing import SIZES, write_checkpoint
    made = not os.path.lexists(out)
    try:
        if made:
            os.mkdir(out)  # 0777 & ~umask, like any folder the user makes
        tmp = tempfile.mkdtemp(prefix=".jv5fast-checkpoint-", dir=out)
    except OSError as e:
        raise CLIError(f"cannot write DIR {out}: {e.strerror or e}", code=1) from None
    final, moved = os.path.abspath(out), []
    try:
        write_checkpoint(tmp, a.family, a.size, a.seed, real_tokenizer=True,
                         config_overrides={"jv5fast_random_weights": True})
        for task in sorted(os.listdir(os.path.join(tmp, "adapters"))):  # it recorded the hidden folder
            path = os.path.join(tmp, "adapters", task, "adapter_config.json")
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
            cfg["base_model_name_or_path"] = final
            with open(path, "w", encoding="utf-8") as f:
                json.dump(cfg, f, indent=2)
        with open(os.path.join(tmp, "README.txt"), "w", encoding="utf-8") as f:
            f.write(_RANDOM_README.format(version=jv5fast_version(), family=a.family, size=a.size, seed=a.seed,
                                          hub_id=_HUB_IDS[a.family]))
        from ..onnx_export import _umask
        mode = 0o666 & ~_umask()
        for root, _, files in os.walk(tmp):  # safetensors writes 0600; a model folder is readable as usual
            for name in files:
                os.chmod(os.path.join(root, name), mode)
        entries = sorted(os.listdir(tmp), key=lambda n: (n == "config.json", n != "README.txt", n))
        for name in entries:  # README.txt first, config.json (what makes it a checkpoint) last
            os.replace(os.path.join(tmp, name), os.path.join(out, name))
            moved.append(name)
        os.rmdir(tmp)
    except BaseException:  # Ctrl-C and a full disk too: DIR goes back to what it was (empty, or absent)
        shutil.rmtree(tmp, ignore_errors=True)
        for name in moved:  # only what this command wrote: DIR was empty or absent
            path = os.path.join(out, name)
            try:
                if os.path.isdir(path):
                    shutil.rmtree(path)
                else:
                    os.remove(path)
            except OSError:
                pass
        if made:
            try:
                os.rmdir(out)
            except OSError:  # not empty (something else wrote there): left as it is
                pass
        raise
    dim = SIZES[(a.family, a.size)]["hidden_size"]
    print(f"wrote a {a.family} {a.size} checkpoint ({dim}-d, seed {a.seed}) -> {out}", file=sys.stderr)
    print(f"WARNING: RANDOM WEIGHTS. {out} is not a trained model and its embeddings are MEANINGLESS: use it "
          f"to try commands and test offline, never to compare texts (see {os.path.join(out, 'README.txt')}). "
          f"Real model: --model {_HUB_IDS[a.family]}", file=sys.stderr)
    return 0

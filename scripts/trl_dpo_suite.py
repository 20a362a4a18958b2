"""Run TRL's own DPOTrainer tests offline, against stock `trl.DPOTrainer` or with `NaPOTrainer` swapped in.

    python scripts/trl_dpo_suite.py --test-file TRL_CHECKOUT/tests/test_dpo_trainer.py --trainer napo \
        --out benchmarks/trl_compat/napo.json

TRL's tests load tiny models (`trl-internal-testing/tiny-*`) and small datasets (`trl-internal-testing/zen*`) from
the Hub. This script, at run time and in a temporary folder (nothing of TRL's is copied into napo's tree):
  1. builds a stand-in for every model id it can, from its config with random weights (`from_config`), saved with a
     byte-level BPE tokenizer trained locally (Qwen-style `<|im_start|>` chat template) or napo's tiny processors;
  2. writes a `conftest.py` that serves stand-ins of the `zen` datasets (same configs, columns and splits, made-up
     rows) through `datasets.load_dataset`, streaming included;
  3. copies the test file and its `testing_utils.py`, rewriting the model ids to the stand-ins' folders and, with
     `--trainer napo`, `from trl import DPOConfig, DPOTrainer` to napo's classes under those names;
  4. runs pytest on it (tests whose model has no stand-in are deselected and counted as such) and writes a JSON of
     every test's outcome and first error line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

# model id (without "trl-internal-testing/") -> ("causal", model_type) or ("napo", family of napo.models)
STAND_INS: dict[str, tuple[str, str]] = {
    "tiny-Qwen2ForCausalLM-2.5": ("causal", "qwen2"),
    "tiny-Cohere2ForCausalLM": ("causal", "cohere2"),
    "tiny-Glm4MoeForCausalLM": ("causal", "glm4_moe"),
    "tiny-GptOssForCausalLM": ("causal", "gpt_oss"),
    "tiny-Qwen3MoeForCausalLM": ("causal", "qwen3_moe"),
    "tiny-Olmo3ForCausalLM": ("causal", "olmo3"),
    "tiny-Lfm2ForCausalLM": ("causal", "lfm2"),
    "tiny-Lfm2ForCausalLM-2.5": ("causal", "lfm2"),
    "tiny-LlavaForConditionalGeneration": ("napo", "llava"),
    "tiny-Qwen2VLForConditionalGeneration": ("napo", "qwen2_vl"),
    "tiny-Qwen2_5_VLForConditionalGeneration": ("napo", "qwen2_vl"),
    "tiny-Idefics3ForConditionalGeneration": ("napo", "idefics3"),
}
TINY_SIZES = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    max_position_embeddings=512,
)
MOE_SIZES = {
    "qwen3_moe": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        decoder_sparse_step=1,
        output_router_logits=True,
        router_aux_loss_coef=0.01,
    ),
    "gpt_oss": dict(
        num_local_experts=4,
        num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=8,
        output_router_logits=True,
        router_aux_loss_coef=0.01,
    ),
    "glm4_moe": dict(
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        first_k_dense_replace=1,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
    ),
}
QWEN_TEMPLATE = (
    "{%- for message in messages -%}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
    "{%- for part in message['content'] -%}{%- if part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{{ '<|im_end|>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
WORDS = "the sky is blue grass green water wet fire hot snow cold sun bright moon night tree tall".split()

CONFTEST = """
import datasets, numpy as np
from PIL import Image

WORDS = {words!r}

def _rows(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w = [WORDS[j] for j in rng.integers(0, len(WORDS), 6)]
        out.append(("The " + w[0] + " is", " " + w[1] + " " + w[2] + ".", " " + w[3] + "."))
    return out

def _image(rng):
    return Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))

def _split(name, config, n, seed):
    rng = np.random.default_rng(seed)
    rows = []
    for k, (p, c, r) in enumerate(_rows(n, seed)):
        user = [{{"role": "user", "content": p}}]
        if name == "zen" and config == "standard_preference":
            rows.append({{"prompt": p, "chosen": c, "rejected": r}})
        elif name == "zen" and config == "conversational_preference":
            rows.append({{"prompt": user, "chosen": [{{"role": "assistant", "content": c}}],
                         "rejected": [{{"role": "assistant", "content": r}}]}})
        elif name == "zen" and config == "standard_implicit_prompt_preference":
            rows.append({{"chosen": p + c, "rejected": p + r}})
        elif name == "zen" and config == "conversational_implicit_prompt_preference":
            rows.append({{"chosen": user + [{{"role": "assistant", "content": c}}],
                         "rejected": user + [{{"role": "assistant", "content": r}}]}})
        elif name == "zen" and config == "standard_unpaired_preference":
            rows.append({{"prompt": p, "completion": c, "label": bool(k % 2)}})
        elif name == "zen" and config == "standard_language_modeling":
            rows.append({{"text": p + c}})
        elif name in ("zen-image", "zen-multi-image"):
            n_images = 1 if name == "zen-image" else 2
            content = [{{"type": "image"}}] * n_images + [{{"type": "text", "text": p}}]
            rows.append({{"images": [_image(rng) for _ in range(n_images)],
                         "prompt": [{{"role": "user", "content": content}}],
                         "chosen": [{{"role": "assistant", "content": [{{"type": "text", "text": c}}]}}],
                         "rejected": [{{"role": "assistant", "content": [{{"type": "text", "text": r}}]}}]}})
        elif name == "toolcall":
            tool = {{"type": "function", "function": {{"name": "weather", "description": "the weather",
                     "parameters": {{"type": "object", "properties": {{"city": {{"type": "string"}}}}}}}}}}
            rows.append({{"prompt": user, "chosen": [{{"role": "assistant", "content": c}}],
                         "rejected": [{{"role": "assistant", "content": r}}],
                         "tools": __import__("json").dumps([tool])}})
        elif name == "harmony":
            rows.append({{"prompt": [{{"role": "system", "content": "be brief"}}] + user,
                         "chosen": [{{"role": "assistant", "content": c}}],
                         "rejected": [{{"role": "assistant", "content": r}}]}})
        else:
            raise ValueError(f"no stand-in for dataset {{name}}/{{config}}")
    return datasets.Dataset.from_list(rows)

_real_load_dataset = datasets.load_dataset

def load_dataset(path, name=None, split=None, streaming=False, **kwargs):
    if not str(path).startswith("trl-internal-testing/"):
        return _real_load_dataset(path, name, split=split, streaming=streaming, **kwargs)
    dataset_name = path.split("/", 1)[1]
    splits = {{"train": _split(dataset_name, name, 17, 0), "test": _split(dataset_name, name, 5, 1)}}
    if streaming:
        splits = {{k: v.to_iterable_dataset() for k, v in splits.items()}}
        return splits[split] if split else datasets.IterableDatasetDict(splits)
    return splits[split] if split else datasets.DatasetDict(splits)

datasets.load_dataset = load_dataset

# TRL's CI runs on GPUs; DPOConfig's bf16 default is refused by transformers on a CPU-only machine (and bf16 autocast
# on CPU is several times slower): without CUDA every config trains on the CPU in fp32.
import torch, transformers
if not torch.cuda.is_available():
    _post_init = transformers.TrainingArguments.__post_init__

    def _cpu_post_init(self):
        self.use_cpu = True
        if self.bf16:
            self.bf16 = False
        _post_init(self)

    transformers.TrainingArguments.__post_init__ = _cpu_post_init

# napo's Qwen2-VL stand-in saves an image-only processor (Qwen2-VL's own needs torchvision for videos).
from napo.models import Qwen2VLImageOnlyProcessor
transformers.AutoProcessor.register(transformers.Qwen2VLConfig, Qwen2VLImageOnlyProcessor, exist_ok=True)
"""


def build_tokenizer(folder: Path):
    """A byte-level BPE tokenizer (every text tokenizes, no <unk>) with Qwen's chat markers as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<image>",
        "<|vision_start|>",
        "<|image_pad|>",
        "<|vision_end|>",
        "<|video_pad|>",
    ]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    corpus = [" ".join(WORDS)] * 20 + ["The system user assistant You are a helpful assistant."] * 20
    tokenizer.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=QWEN_TEMPLATE
    )
    fast.save_pretrained(folder)
    return fast


def build_stand_ins(root: Path, needed: set[str]) -> dict[str, str]:
    """Build every needed stand-in under `root`; returns {model id: folder} for those built."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from napo.models import build_tiny_model

    built = {}
    for short in sorted(needed):
        if short not in STAND_INS:
            continue
        kind, name = STAND_INS[short]
        folder = root / short
        if (folder / "config.json").exists():
            built[f"trl-internal-testing/{short}"] = str(folder)
            continue
        torch.manual_seed(0)
        try:
            if kind == "causal":
                tokenizer = build_tokenizer(folder)
                config = AutoConfig.for_model(
                    name,
                    vocab_size=len(tokenizer),
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    **TINY_SIZES,
                    **MOE_SIZES.get(name, {}),
                )
                AutoModelForCausalLM.from_config(config).save_pretrained(folder)
            else:
                model, processor = build_tiny_model(name, seed=0)
                model.save_pretrained(folder)
                processor.save_pretrained(folder)
            built[f"trl-internal-testing/{short}"] = str(folder)
        except Exception as error:  # a family this transformers cannot build tiny: its tests are deselected
            print(f"no stand-in for {short}: {type(error).__name__}: {error}", file=sys.stderr)
            shutil.rmtree(folder, ignore_errors=True)
    return built


def rewrite(source: str, models: dict[str, str], trainer: str) -> str:
    source = source.replace("from .testing_utils import", "from testing_utils import")
    for model_id, folder in models.items():
        source = source.replace(f'"{model_id}"', repr(folder))
    if trainer == "napo":
        source = source.replace(
            "from trl import DPOConfig, DPOTrainer",
            "from napo import NaPOConfig as DPOConfig, NaPOTrainer as DPOTrainer",
        )
    return source


def environment() -> dict:
    """Date, device and library versions of this run."""
    from napo.provenance import provenance

    return provenance()


def rewrite_testing_utils(source: str) -> str:
    """TRL's test helpers, with `from trl.import_utils import (...)` made tolerant of names the installed trl lacks
    (the checkout may be newer or older than the pinned trl): a missing availability check reads False."""
    block = re.search(r"from trl\.import_utils import \(([^)]*)\)", source)
    if block is None:
        return source
    names = [n.strip() for n in block.group(1).split(",") if n.strip()]
    tolerant = "import trl.import_utils as _trl_import_utils\n" + "".join(
        f"{n} = getattr(_trl_import_utils, {n!r}, lambda: False)\n" for n in names
    )
    return source.replace(block.group(0), tolerant)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--test-file", required=True, help="TRL's tests/test_dpo_trainer.py (testing_utils.py beside it)"
    )
    parser.add_argument(
        "--trainer", choices=("trl", "napo"), default="napo", help="stock TRL, or NaPOTrainer swapped in"
    )
    parser.add_argument("--out", required=True, help="JSON file of the outcomes")
    parser.add_argument(
        "--models",
        default=os.path.join(tempfile.gettempdir(), "trl-suite-models"),
        help="folder of the built stand-ins (reused between runs)",
    )
    parser.add_argument("--pytest-args", default="", help="extra pytest arguments, e.g. '-k loss_types'")
    args = parser.parse_args()

    test_file = Path(args.test_file).resolve()
    source = test_file.read_text()
    needed = set(re.findall(r'"trl-internal-testing/(tiny-[^"]+)"', source))
    models = build_stand_ins(Path(args.models), needed)
    missing = sorted(f"trl-internal-testing/{m}" for m in needed if f"trl-internal-testing/{m}" not in models)
    body_ids = ids_in_test_bodies(source)

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        (work / "test_dpo_trainer.py").write_text(rewrite(source, models, args.trainer))
        helpers = (test_file.parent / "testing_utils.py").read_text()
        (work / "testing_utils.py").write_text(rewrite_testing_utils(helpers))
        (work / "conftest.py").write_text(CONFTEST.format(words=WORDS))
        report = work / "report.xml"
        command = [
            sys.executable,
            "-m",
            "pytest",
            str(work / "test_dpo_trainer.py"),
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={report}",
            "-o",
            "junit_family=xunit1",
            *args.pytest_args.split(),
        ]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(work), os.environ.get("PYTHONPATH", "")])}
        subprocess.run(command, cwd=work, env=env)
        outcomes = parse_junit(report, missing, body_ids, str(Path(args.models)))

    counts: dict[str, int] = {}
    for outcome in outcomes.values():
        counts[outcome["outcome"]] = counts.get(outcome["outcome"], 0) + 1
    result = {
        "trainer": args.trainer,
        "test_file": str(test_file),
        "counts": counts,
        "no_stand_in": missing,
        "command": " ".join(sys.argv),
        **environment(),
        "tests": outcomes,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    from napo.provenance import write_json_atomic

    write_json_atomic(args.out, result)
    print(json.dumps(counts))


def ids_in_test_bodies(source: str) -> dict[str, set[str]]:
    """{test function name: the `trl-internal-testing/tiny-*` ids its body (not its parameters) names}."""
    import ast

    found = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            body = "\n".join(ast.get_source_segment(source, statement) or "" for statement in node.body)
            found[node.name] = set(re.findall(r'"(trl-internal-testing/tiny-[^"]+)"', body))
    return found


def parse_junit(report: Path, missing: list[str], body_ids: dict[str, set[str]], models_root: str) -> dict[str, dict]:
    """{test id: {"outcome": passed/failed/skipped/no_stand_in, "message": first line}} from pytest's JUnit XML. A test
    whose parameters or body name a model without a stand-in is "no_stand_in" whatever pytest said (it tried the
    Hub)."""
    outcomes = {}
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        test_id = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message = "failed", ((child.get("message") or "").splitlines() or [""])[0][:300]
            elif child.tag == "skipped":
                outcome, message = "skipped", (child.get("message") or "")[:300]
        function, _, parameters = case.get("name", "").partition("[")
        # A test run with a stand-in's folder as parameter is judged on it; others on the ids their body names.
        named = {m for m in missing if m in parameters}
        if not named and models_root not in parameters:
            named = {m for m in missing if m in body_ids.get(function, set())}
        if named:
            outcome = "no_stand_in"
        outcomes[test_id] = {"outcome": outcome, "message": message}
    return outcomes


if __name__ == "__main__":
    main()

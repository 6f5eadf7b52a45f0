"""The real-format world: a tiny Llama model and PEFT LoRA adapters, built from code on CPU in seconds.

It mirrors the embedded repository's generative world (`evomerge_sdk.local.tasks`) in real files, so the
PEFT backend is tested and benchmarked on what users have: a transformers model folder (config.json,
model.safetensors, a `tokenizers` tokenizer) and adapter folders written by PEFT itself.

Words carry latent features: a general word has phi in R^kg, a domain word psi in R^kd. A prompt is a
type marker (`ner:`), general and domain words of one domain, then `?`; the completion is one label word:

    label(t, d) = argmax  U_t phi_bar + V_d psi_bar + eps * T_td [phi_bar; psi_bar]

U_t (the type's reading of general words) transfers across domains, V_d (the domain's reading of its
lexicon) across types, T_td is specific to the pair. An inverted task takes the argmin (a labelling bug:
harmful, its negation helps); an off-grid task (`tr:`) answers a domain word (irrelevant). The base is
pre-trained on a generic mixture over the same words (random readings behind their own markers and a
domain language-model task) so that its features are shared, but it knows none of the adapters' readings.

Two adapter variants, both trained with PEFT: `own_seed` (each adapter's LoRA initialisation from its own
seed, cosine ~0 between A's, as in real independent training) and `shared_seed` (every adapter built after
one `torch.manual_seed`, as LLaMA-Factory's `set_seed(42)` does, so all A's start equal).

Everything is cached under a folder named by a hash of the config and `WORLD_VERSION`, built in a
temporary folder and renamed into place, so a half-built world is never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import attrs
import numpy as np
from numpy.typing import NDArray

__all__ = ["WORLD_VERSION", "World", "WorldConfig", "build_world", "default_world_dir"]

WORLD_VERSION = 2
"""Bumped whenever the code changes what a config builds; part of the cache key."""
Variant = Literal["own_seed", "shared_seed"]
_TYPES = ("ner", "re", "et", "ee")
_DOMAINS = ("news", "bio", "law", "fin", "med", "chem")
_LABELS = ("red", "orange", "yellow", "green", "blue", "violet", "gray", "pink")
_SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")
_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_SHARED_INIT_SEED = 42  # LLaMA-Factory's set_seed(42)
_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %} {{ m['content'] }}"
    "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
)
"""Messages are the world's plain prompts after <s>: user turn = prompt, assistant turn = answer."""

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]


def _positive(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name} must be a positive integer, got {value!r}")


@attrs.frozen
class WorldConfig:
    """What a world is made of; every field is part of the cache key. Defaults are CI-sized."""

    seed: int = attrs.field(default=0, validator=attrs.validators.instance_of(int))
    types: int = attrs.field(default=3, validator=[_positive, attrs.validators.le(len(_TYPES))])
    domains: int = attrs.field(default=4, validator=[_positive, attrs.validators.le(len(_DOMAINS))])
    labels: int = attrs.field(default=6, validator=[_positive, attrs.validators.le(len(_LABELS))])
    general_words: int = attrs.field(default=24, validator=_positive)
    domain_words: int = attrs.field(default=8, validator=_positive)
    prompt_general: int = attrs.field(default=3, validator=_positive)
    prompt_domain: int = attrs.field(default=3, validator=_positive)
    hidden: int = attrs.field(default=48, validator=_positive)
    layers: int = attrs.field(default=2, validator=_positive)
    rank: int = attrs.field(default=4, validator=_positive)
    lora_alpha: int = attrs.field(default=8, validator=_positive)
    pretrain_steps: int = attrs.field(default=400, validator=_positive)
    adapter_steps: int = attrs.field(default=80, validator=_positive)
    batch: int = attrs.field(default=64, validator=_positive)
    validation: int = attrs.field(default=64, validator=_positive)
    held_out: int = attrs.field(default=64, validator=_positive)
    test: int = attrs.field(default=200, validator=_positive)

    def key(self) -> str:
        """Hash of the config and WORLD_VERSION: the cache key."""
        blob = json.dumps([WORLD_VERSION, attrs.asdict(self)], sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


@attrs.frozen
class _Task:
    kind: Literal["grid", "inverted", "offgrid"]
    type_index: int  # -1 for off-grid
    domain_index: int

    def name(self) -> str:
        domain = _DOMAINS[self.domain_index]
        if self.kind == "offgrid":
            return f"tr-{domain}"
        suffix = "-inverted" if self.kind == "inverted" else ""
        return f"{_TYPES[self.type_index]}-{domain}{suffix}"


@attrs.frozen
class World:
    """A built world: where its base, adapters and data sets lie, and what each adapter is."""

    root: Path
    config: WorldConfig
    variant: str
    base: Path
    adapters: dict[str, Path]
    roles: dict[str, str]  # adapter name -> "specialist" | "harmful" | "irrelevant"
    targets: tuple[str, ...]  # out-of-domain targets: grid tasks with a data set
    label_words: tuple[str, ...]

    def data(self, target: str, split: str) -> Path:
        """The JSONL file of a target's split ("validation", "held_out", "test")."""
        return self.root / "data" / target / f"{split}.jsonl"

    def pool(self, target: str) -> dict[str, Path]:
        """The out-of-domain pool of a target: every adapter but the target's own specialist."""
        if target not in self.targets:
            raise ValueError(f"unknown target {target!r}; this world has {list(self.targets)}")
        return {name: path for name, path in self.adapters.items() if name != target}


def default_world_dir() -> Path:
    """`$EVOMERGE_CACHE_DIR/peft-worlds`, else `$XDG_CACHE_HOME/evomerge-sdk/peft-worlds`, else ~/.cache."""
    env = os.environ.get("EVOMERGE_CACHE_DIR")
    if env:
        return Path(env) / "peft-worlds"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "evomerge-sdk" / "peft-worlds"


# -- the generative part (numpy, seeded) -------------------------------------------------------------
class _Generator:
    """Words, their features, the readings of every task, and a sampler of prompts."""

    def __init__(self, config: WorldConfig) -> None:
        c = config
        rng = np.random.default_rng([c.seed, 20250916])
        self.config = c
        self.general = [f"g{i}" for i in range(c.general_words)]
        self.domain = [[f"{_DOMAINS[d]}{i}" for i in range(c.domain_words)] for d in range(c.domains)]
        self.labels = list(_LABELS[: c.labels])
        self.markers = [f"{t}:" for t in _TYPES[: c.types]] + ["tr:", "lm:"] + [f"p{i}:" for i in range(4)]
        kg, kd = 6, 4
        self.phi = rng.standard_normal((c.general_words, kg))
        self.psi = rng.standard_normal((c.domains, c.domain_words, kd))
        self.u = rng.standard_normal((c.types, c.labels, kg))
        self.v = rng.standard_normal((c.domains, c.labels, kd)) * np.sqrt(kg / kd)
        self.t = 0.3 * rng.standard_normal((c.types, c.domains, c.labels, kg + kd))
        self.pretrain_readings = rng.standard_normal((4, c.labels, kg + kd))
        self.translation = np.stack([rng.permutation(c.domain_words) for _ in range(c.domains)])
        words = [*_SPECIALS, *self.markers, "?", *self.general, *(w for ws in self.domain for w in ws)]
        self.vocab = {w: i for i, w in enumerate([*words, *self.labels])}

    def tasks(self) -> list[_Task]:
        """Every adapter's task: the grid, two inverted (harmful) and two off-grid (irrelevant) tasks."""
        c = self.config
        grid = [_Task("grid", t, d) for t in range(c.types) for d in range(c.domains)]
        inverted = [_Task("inverted", i % c.types, (i + 1) % c.domains) for i in range(2)]
        offgrid = [_Task("offgrid", -1, d) for d in (0, c.domains - 1)]
        return grid + inverted + offgrid

    def targets(self) -> list[_Task]:
        """Out-of-domain targets: grid tasks without an inverted twin (negated, it would be a specialist)."""
        twins = {(t.type_index, t.domain_index) for t in self.tasks() if t.kind == "inverted"}
        grid = [t for t in self.tasks() if t.kind == "grid" and (t.type_index, t.domain_index) not in twins]
        order = np.random.default_rng([self.config.seed, 7]).permutation(len(grid))
        return [grid[i] for i in order]

    def sample(
        self, task: _Task | tuple[str, int], n: int, rng: np.random.Generator
    ) -> tuple[list[str], list[str]]:
        """n prompts of a task (or of a pre-training mixture part) and their completions."""
        c = self.config
        domains = (
            rng.integers(0, c.domains, n) if not isinstance(task, _Task) else np.full(n, task.domain_index)
        )
        gi = rng.integers(0, c.general_words, (n, c.prompt_general))
        di = rng.integers(0, c.domain_words, (n, c.prompt_domain))
        phi_bar = self.phi[gi].mean(axis=1)
        psi_bar = self.psi[domains[:, None], di].mean(axis=1)
        both = np.concatenate([phi_bar, psi_bar], axis=1)
        if isinstance(task, _Task) and task.kind != "offgrid":
            t, d = task.type_index, task.domain_index
            score = phi_bar @ self.u[t].T + psi_bar @ self.v[d].T + both @ self.t[t, d].T
            pick = np.argmin(score, axis=1) if task.kind == "inverted" else np.argmax(score, axis=1)
            marker = f"{_TYPES[t]}:"
            answers = [self.labels[int(k)] for k in pick]
        elif isinstance(task, _Task):  # off-grid: translate the first domain word
            marker = "tr:"
            answers = [self.domain[task.domain_index][int(self.translation[task.domain_index, di[i, 0]])]
                       for i in range(n)]  # fmt: skip
        elif task[0] == "lm":  # pre-training: a word of the prompt's domain
            marker = "lm:"
            pick = rng.integers(0, c.domain_words, n)
            answers = [self.domain[int(domains[i])][int(pick[i])] for i in range(n)]
        else:  # pre-training: a random reading of the features behind its own marker
            marker = f"p{task[1]}:"
            pick = np.argmax(both @ self.pretrain_readings[task[1]].T, axis=1)
            answers = [self.labels[int(k)] for k in pick]
        prompts = []
        for i in range(n):
            words = [self.general[int(g)] for g in gi[i]] + [
                self.domain[int(domains[i])][int(w)] for w in di[i]
            ]
            order = rng.permutation(len(words))
            prompts.append(" ".join([marker, *(words[int(j)] for j in order), "?"]))
        return prompts, answers

    def encode(self, prompts: list[str], answers: list[str]) -> IntArray:
        """Token ids <s> prompt answer (the world's words are whole tokens)."""
        rows = [[self.vocab["<s>"], *(self.vocab[w] for w in p.split()), self.vocab[a]]
                for p, a in zip(prompts, answers, strict=True)]  # fmt: skip
        return np.array(rows, dtype=np.int64)


# -- files -------------------------------------------------------------------------------------------
def _write_tokenizer(gen: _Generator, folder: Path) -> None:
    """A word-level tokenizer made with `tokenizers`, saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=gen.vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", gen.vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = _CHAT_TEMPLATE
    fast.save_pretrained(folder)


def _write_jsonl(path: Path, prompts: list[str], answers: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for p, a in zip(prompts, answers, strict=True):
            fh.write(json.dumps({"prompt": p, "completion": " " + a}) + "\n")


def _completion_loss(model: Any, ids: Any) -> Any:
    """Cross-entropy of the last token (the completion) given everything before it."""
    import torch

    logits = model(input_ids=ids[:, :-1]).logits[:, -1, :]
    return torch.nn.functional.cross_entropy(logits.float(), ids[:, -1])


def _pretrain(gen: _Generator, folder: Path) -> None:
    """Random-init Llama pre-trained on the generic mixture; saved with its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    c = gen.config
    torch.manual_seed(c.seed)
    cfg = LlamaConfig(
        vocab_size=len(gen.vocab), hidden_size=c.hidden, intermediate_size=2 * c.hidden,
        num_hidden_layers=c.layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=gen.vocab["<s>"],
        eos_token_id=gen.vocab["</s>"], pad_token_id=gen.vocab["<pad>"],
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=c.pretrain_steps)
    rng = np.random.default_rng([c.seed, 1])
    parts: list[tuple[str, int]] = [("lm", 0)] + [("p", i) for i in range(4)]
    per = max(1, c.batch // len(parts))
    model.train()
    for _ in range(c.pretrain_steps):
        losses = []
        for part in parts:
            ids = torch.from_numpy(gen.encode(*gen.sample(part, per, rng)))
            losses.append(_completion_loss(model, ids))
        loss = torch.stack(losses).mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(folder)
    _write_tokenizer(gen, folder)


def _train_adapter(gen: _Generator, base: Path, task: _Task, index: int, variant: Variant, out: Path) -> None:
    """One LoRA adapter trained with PEFT on one task, saved with PEFT's own `save_pretrained`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    c = gen.config
    model = LlamaForCausalLM.from_pretrained(base, local_files_only=True)
    torch.manual_seed(_SHARED_INIT_SEED if variant == "shared_seed" else 1000 * c.seed + index + 1)
    lora = LoraConfig(
        r=c.rank, lora_alpha=c.lora_alpha, target_modules=list(_TARGET_MODULES), lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )  # fmt: skip
    peft_model = get_peft_model(model, lora)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=c.adapter_steps)
    rng = np.random.default_rng([c.seed, 2, index])
    peft_model.train()
    for _ in range(c.adapter_steps):
        ids = torch.from_numpy(gen.encode(*gen.sample(task, c.batch, rng)))
        _completion_loss(peft_model, ids).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    peft_model.save_pretrained(out)


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished build into place; another process that finished first wins."""
    try:
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.exists():
            raise


def build_world(
    config: WorldConfig | None = None,
    root: str | os.PathLike[str] | None = None,
    variant: Variant = "own_seed",
) -> World:
    """The world of `config` (default CI-sized) under `root` (default `default_world_dir()`), built once.

    The base and the data sets are shared by both variants; each variant's adapters are built on first
    use. Training runs on CPU with torch's current thread setting.
    """
    import torch

    config = config or WorldConfig()
    if variant not in ("own_seed", "shared_seed"):
        raise ValueError(f"variant must be 'own_seed' or 'shared_seed', got {variant!r}")
    folder = Path(root) if root is not None else default_world_dir()
    folder = folder / f"world-{config.key()[:16]}"
    folder.mkdir(parents=True, exist_ok=True)
    gen = _Generator(config)
    tasks = gen.tasks()
    targets = gen.targets()
    with torch.random.fork_rng(devices=[]):
        if not (folder / "base" / "config.json").exists():
            tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".base-"))
            _pretrain(gen, tmp)
            _publish(tmp, folder / "base")
        if not (folder / "data").exists():
            tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".data-"))
            for k, task in enumerate(targets):
                rng = np.random.default_rng([config.seed, 3, k])
                for split, n in (("validation", config.validation), ("held_out", config.held_out),
                                 ("test", config.test)):  # fmt: skip
                    _write_jsonl(tmp / task.name() / f"{split}.jsonl", *gen.sample(task, n, rng))
            _publish(tmp, folder / "data")
        adapters = folder / f"adapters-{variant.replace('_', '-')}"
        if not adapters.exists():
            tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".adapters-"))
            for index, task in enumerate(tasks):
                _train_adapter(gen, folder / "base", task, index, variant, tmp / task.name())
            _publish(tmp, adapters)
    role = {"grid": "specialist", "inverted": "harmful", "offgrid": "irrelevant"}
    return World(
        root=folder,
        config=config,
        variant=variant,
        base=folder / "base",
        adapters={t.name(): adapters / t.name() for t in tasks},
        roles={t.name(): role[t.kind] for t in tasks},
        targets=tuple(t.name() for t in targets),
        label_words=tuple(gen.labels),
    )

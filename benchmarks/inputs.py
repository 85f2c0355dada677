"""The benchmark's checkpoints: their shapes, building each once into the work folder, where
their step folders are, what the converter is told about their models, and the I/O floor's
read plan.

Every input is a real multi-rank DCP save, so its chunks are spread over several shard files
as a training job leaves them:

* llama3 inputs come from ``demo.writer`` (FSDP2 over gloo ranks, ``torch.distributed.
  checkpoint.save``, torchtitan 0.3.0's layout), each rank seeding its own shards: a 9 GB
  checkpoint never exists whole in any process's memory;
* the qwen3 MoE input is what torchtitan 0.3.0's own ``CheckpointManager`` saves
  (``tests/peers/qwen3_writer.py``): the model-only float32 save of a one-step run.

``--small`` swaps every shape for a tiny one (same kinds, ranks and layouts), so that a smoke
run goes through every builder, method and table in a few minutes.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from converter.sources.dcp import DcpIndex
from converter.sources.storage import LocalStorage
from demo import writer as demo

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CHECKPOINT = "checkpoint"  # the checkpoint folder, holding step-N folders


@dataclass(frozen=True)
class LlamaInput:
    """A llama3 checkpoint written by ``demo.writer``'s FSDP2 ranks, each seeding its shards."""

    name: str
    shape: demo.ModelShape
    kind: str  # weights_only | full
    ranks: int
    step: int
    note: str
    family = "llama3"

    def folder(self, work: Path) -> Path:
        return work / "inputs" / self.name

    def step_dir(self, work: Path) -> Path:
        return self.folder(work) / CHECKPOINT / f"step-{self.step}"

    def built(self, work: Path) -> bool:
        """A complete save: DCP writes ``.metadata`` last."""
        return (self.step_dir(work) / ".metadata").is_file()

    def build(self, work: Path) -> None:
        """One DCP save by ``ranks`` processes (the writer replaces an incomplete one)."""
        spec = demo.StepSpec(self.step_dir(work), None, self.shape, demo.TORCHTITAN_0_3, self.kind)
        demo.write_steps_from_files([spec], self.ranks)

    def model_overrides(self, work: Path) -> list[str]:
        """The converter's model settings, as the shape was saved (``work``: unused, the
        shape is known before the save)."""
        s = self.shape
        return [
            f"experiment.model.n_heads={s.n_heads}",
            f"experiment.model.n_kv_heads={s.n_kv_heads}",
            f"experiment.model.n_layers={s.n_layers}",
            f"experiment.model.dim={s.dim}",
            f"experiment.model.vocab_size={s.vocab_size}",
            f"experiment.model.hidden_dim={s.hidden_dim}",
        ]

    def baseline_args(self) -> list[str]:
        """``hf_baseline.py``'s model options."""
        s = self.shape
        dims = {
            "dim": s.dim,
            "n-layers": s.n_layers,
            "n-heads": s.n_heads,
            "n-kv-heads": s.n_kv_heads,
            "vocab-size": s.vocab_size,
            "hidden-dim": s.hidden_dim,
        }
        return [
            *(f"--{k}={v}" for k, v in dims.items()),
            *(["--tied"] if s.tied_embeddings else []),
        ]

    def describe(self, work: Path) -> str:
        s = self.shape
        return (
            f"llama3: dim {s.dim}, {s.n_layers} layers, {s.n_heads}/{s.n_kv_heads} heads, "
            f"vocab {s.vocab_size}, hidden {s.hidden_dim}"
        )


@dataclass(frozen=True)
class Qwen3Input:
    """A qwen3 checkpoint saved by torchtitan 0.3.0's own CheckpointManager on two FSDP2 ranks
    (``tests/peers/qwen3_writer.py``): one training step, saved model-only in float32."""

    name: str
    flavor: str  # a torchtitan qwen3 flavor, or one of qwen3_writer's tiny variants
    note: str
    kind = "weights_only"
    family = "qwen3"
    ranks = 2  # titan_writer's WORLD_SIZE
    step = 1  # a one-step run: its last step is its only save, model-only

    def folder(self, work: Path) -> Path:
        """The writer's dump: ``checkpoint/step-1`` and the ``model.json`` of the model."""
        return work / "inputs" / self.name

    def step_dir(self, work: Path) -> Path:
        return self.folder(work) / CHECKPOINT / f"step-{self.step}"

    def built(self, work: Path) -> bool:
        """The writer's job is over: it writes ``model.json`` after its checkpoints."""
        return (self.folder(work) / "model.json").is_file()

    def build(self, work: Path) -> None:
        from tests.peers import qwen3_writer

        shutil.rmtree(self.folder(work), ignore_errors=True)  # the writer will not resume one
        # interval > steps: no full save before the last step, which saves the model alone.
        qwen3_writer.write_checkpoints(
            self.folder(work),
            variant=self.flavor,
            export_dtype="float32",
            steps=self.step,
            interval=self.step + 1,
        )

    def model(self, work: Path) -> dict:
        """``model.json``: the dimensions the writer's torchtitan config had."""
        return json.loads((self.folder(work) / "model.json").read_text())

    def model_overrides(self, work: Path) -> list[str]:
        """What a user states for a qwen3 model without a preset; the weights give the rest."""
        m = self.model(work)
        return [
            "experiment/model=qwen3",
            f"experiment.model.tied_embeddings={str(m['tied']).lower()}",
            f"experiment.model.top_k={m['top_k']}",
            f"experiment.model.route_norm={str(m['route_norm']).lower()}",
            f"experiment.model.norm_eps={m['norm_eps']}",
            f"experiment.model.rope_theta={m['rope_theta']}",
            f"experiment.model.max_seq_len={m['max_seq_len']}",
        ]

    def describe(self, work: Path) -> str:
        m = self.model(work)
        return (
            f"qwen3 {self.flavor}: dim {m['dim']}, {m['n_layers']} layers, {m['n_experts']} "
            f"experts (top {m['top_k']}) of width {m['moe_hidden_dim']}, "
            f"{m['n_heads']}/{m['n_kv_heads']} heads, vocab {m['vocab_size']}"
        )


Input = LlamaInput | Qwen3Input


# Their roles in the targets (README's issues): the 2.6 GB dense input (#12, and #13's
# comparison), the full training checkpoint and its model saved weights-only (bytes read and
# hashed), the ~10 GB input (#16), and the MoE input (#13), of the 2.6 GB dense input's size:
# a conversion's fixed costs (start-up, threads, the last fsync) weigh the same on both, so
# their MB/s compare like with like.
DENSE, FULL, FULL_TWIN, LARGE, MOE = (
    "weights_650M", "full_180M", "weights_180M", "weights_2300M", "moe_630M"
)  # fmt: skip


def _llama(name: str, kind: str, ranks: int, step: int, note: str, **shape: int) -> LlamaInput:
    return LlamaInput(name, demo.ModelShape(**shape), kind, ranks, step, note)


FULL_180M_SHAPE = dict(
    dim=1024, n_layers=10, n_heads=16, n_kv_heads=8, vocab_size=32000, hidden_dim=2816
)
INPUTS: tuple[Input, ...] = (
    _llama(
        DENSE, "weights_only", 2, 1000, "~2.6 GB",
        dim=2048, n_layers=11, n_heads=16, n_kv_heads=8, vocab_size=32000, hidden_dim=5632,
    ),
    # AdamW exp_avg/exp_avg_sq beside the model: a third of its ~2.2 GB is the model.
    _llama(FULL, "full", 2, 2, "~2.2 GB, a third of it the model", **FULL_180M_SHAPE),
    # The same model saved weights-only: what the full one's conversion should read and hash.
    _llama(
        FULL_TWIN, "weights_only", 2, 2, "full_180M's model, weights-only",
        **FULL_180M_SHAPE,
    ),
    _llama(
        LARGE, "weights_only", 4, 1000, "~9.3 GB",
        dim=2560, n_layers=24, n_heads=20, n_kv_heads=4, vocab_size=128256, hidden_dim=6912,
    ),
    Qwen3Input(MOE, "debugmodel_moe_16", "~2.5 GB, 64 experts, the 2.6 GB dense input's size"),
)  # fmt: skip
TINY_180M_SHAPE = dict(
    dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1024, hidden_dim=256
)
SMALL: tuple[Input, ...] = (
    _llama(
        DENSE, "weights_only", 2, 1000, "small",
        dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=2048, hidden_dim=512,
    ),
    _llama(FULL, "full", 2, 2, "small", **TINY_180M_SHAPE),
    _llama(FULL_TWIN, "weights_only", 2, 2, "small", **TINY_180M_SHAPE),
    _llama(
        LARGE, "weights_only", 4, 1000, "small",
        dim=512, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=4096, hidden_dim=1024,
    ),
    Qwen3Input(MOE, "moe", "small: 16 experts"),
)  # fmt: skip
NAMES = tuple(i.name for i in INPUTS)


def select(small: bool, names: list[str] | None = None) -> tuple[Input, ...]:
    """The inputs of a run (all unless ``names`` picks some), full-size or small."""
    return tuple(i for i in (SMALL if small else INPUTS) if names is None or i.name in names)


def by_name(small: bool, name: str) -> Input:
    return next(i for i in select(small) if i.name == name)


def file_bytes(step_dir: Path) -> int:
    """Every file of a step folder."""
    return sum(p.stat().st_size for p in step_dir.iterdir() if p.is_file())


def write_floor_plan(step_dir: Path, keys: list[str], out_bytes: int, plan: Path) -> int:
    """``floor.py``'s plan: the shard byte ranges that hold ``keys`` (what a conversion must
    read) and the output's size; returns the bytes those ranges hold."""
    index = DcpIndex(LocalStorage(str(step_dir.parent)), str(step_dir))
    reads = sorted((str(c.file), c.offset, c.length) for k in keys for c in index.tensors[k].chunks)
    plan.write_text(json.dumps({"reads": reads, "out_bytes": out_bytes}))
    return sum(length for _, _, length in reads)

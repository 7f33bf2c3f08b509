"""The `generate` stage: a loaded model writes descriptions for titles, in batches, from a run or a plain model.

    prodesc generate --run runs/smol "Girls Ballet Tutu Neon Pink"     # generator.generate_cli
    gen = Generator.from_run(Path("runs/smol")); gen.describe(["Red Mug"])

Inside: `generator` (Generator and the verb), `processors` (answer-only logits processors), `fast` (compiled
static-cache decoding on CUDA), `continuous` (the continuous-batching engine `prodesc serve` runs: `Engine`,
`Row`).
"""

from prodesc.generate.continuous import PHASES, Engine, Row
from prodesc.generate.generator import Generator

__all__ = ["PHASES", "Engine", "Generator", "Row"]

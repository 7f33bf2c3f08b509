"""The `train` stage: TRL's SFTTrainer with a PEFT LoRA adapter, into a self-describing run directory.

    prodesc train --config configs/smollm2-135m.yaml --data demo/data --out runs/smol   # recipe.train_cli

Inside: `recipe` (check, setup, fit, save: the whole verb), `callbacks` (metrics log, NaN guard, throughput),
`checkpoints` (the checkpoint --resume continues from).
"""

"""The `export` stage: a run becomes a model that runs without prodesc (transformers/vLLM, llama.cpp, Ollama).

    prodesc export runs/smol --out exports/smol                                  # exporter.export
    prodesc export runs/smol --out exports/smol-gguf --format gguf --gguf-type q8_0

Inside: `exporter` (checks, the merged checkpoint, the verb), `gguf_file` (llama.cpp's converter and quantizer),
`modelfile` (the Ollama Modelfile).
"""

from prodesc.export.exporter import export

__all__ = ["export"]

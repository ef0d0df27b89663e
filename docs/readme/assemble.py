"""Build README.md from the sections in docs/readme/ (run: python docs/readme/assemble.py)."""
import re
from pathlib import Path

HERE = Path(__file__).parent
ORDER = ["00-intro", "demo", "hessian", "surface", "featvar", "evaluate", "compare", "plot", "interop", "cluster", "gpu",
         "examples", "90-schema"]


def section(name: str) -> str:
    text = (HERE / f"{name}.md").read_text().strip() + "\n"
    if name not in ("00-intro", "90-schema"):
        # every command section is a level-2 heading; its sub-headings one level below
        level = len(re.match(r"#+", text).group(0))
        shift = level - 2
        if shift > 0:
            text = re.sub(r"^(#+)", lambda m: m.group(1)[shift:] if m.group(1).startswith("#" * (shift + 1)) else m.group(1),
                          text, flags=re.M)
    return text


def build() -> str:
    parts = [section(n) for n in ORDER if (HERE / f"{n}.md").exists()]
    return "\n".join(parts).replace("](docs/images/", "](docs/images/")


if __name__ == "__main__":
    (HERE.parent.parent / "README.md").write_text(build())

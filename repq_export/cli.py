"""`repq-export`: checkpoint -> calibrated RepQ-ViT -> exact QDQ ONNX (+ TensorRT engine).

    repq-export --ckpt model.pth --bits 4 --calib images/      export an artifact directory
    repq-export check model.onnx                               the graph's form and its backend's rules
    repq-export demo                                           the whole pipeline on the bundled models
    repq-export predict ARTIFACT IMAGE --save out.png          draw detections
    repq-export serve ARTIFACT / infer URL IMAGE / triton-repo ARTIFACT OUT   serving ([serve] extra)
"""

from __future__ import annotations

import difflib
import sys

from .commands.common import run_command
from .errors import UserError

SUBCOMMANDS = ("export", "check", "demo", "predict", "serve", "infer", "triton-repo")


def unknown_command(word: str) -> UserError:
    """The error for a first word that is neither a command nor an option (a typo such as 'chek')."""
    close = difflib.get_close_matches(word, SUBCOMMANDS, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'?" if close else f"the commands are {', '.join(SUBCOMMANDS)}"
    return UserError(f"unknown command '{word}': {hint} (see repq-export --help)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `repq-export` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-") and argv[0] not in SUBCOMMANDS:
        word = argv[0]

        def refuse() -> int:
            raise unknown_command(word)
        return run_command(refuse)
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else "export"
    rest = argv[1:] if argv and argv[0] in SUBCOMMANDS else argv
    if command == "export":
        from .commands.export import run_export as body
    elif command == "check":
        from .commands.check import run_check as body
    elif command == "demo":
        from .commands.demo import run_demo as body
    elif command == "predict":
        from .commands.predict import run_predict as body
    elif command in ("serve", "infer", "triton-repo"):
        from .commands import serving

        body = {"serve": serving.run_serve, "infer": serving.run_infer, "triton-repo": serving.run_triton_repo}[command]
    return run_command(lambda: body(rest))


if __name__ == "__main__":
    sys.exit(main())

"""Export a trained run to a verified ONNX model in a versioned model repository.

    python -m export runs/imdb-bilstm --repository model_repository [--name imdb-bilstm]
        [--opset N] [--quantize int8] [--fp16]
"""
import argparse
import sys
from pathlib import Path

from export.repository import export_run
from export.verify import ParityError


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a run folder written by python -m models.train")
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--name", help="model name in the repository (default: the run folder's name)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--quantize", choices=["int8"], help="also write a dynamically quantized variant")
    p.add_argument("--fp16", action="store_true", help="also write a float16 variant (CUDA execution provider)")
    p.add_argument("--cases", type=int, default=100, help="random batches in the parity check")
    args = p.parse_args(argv)
    return export_run(args.run, args.repository, args.name, args.opset, args.quantize, args.fp16, args.cases)


if __name__ == "__main__":
    try:
        main()
    except (ParityError, FileNotFoundError, ValueError) as e:
        sys.exit(f"export failed: {e}")

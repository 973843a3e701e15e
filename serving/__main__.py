"""Serve the model repository over HTTP.

    python -m serving --repository model_repository [--host 0.0.0.0] [--port 8000]

Every setting can also come from the environment as RNNSERVE_<NAME> (serving/settings.py).
"""
import argparse
import logging

import uvicorn

from serving.app import create_app
from serving.settings import Settings


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m serving", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", help="model repository folder (RNNSERVE_REPOSITORY)")
    p.add_argument("--host", help="RNNSERVE_HOST, default 0.0.0.0")
    p.add_argument("--port", type=int, help="RNNSERVE_PORT, default 8000")
    args = p.parse_args(argv)
    settings = Settings(**{k: v for k, v in vars(args).items() if v is not None})
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info",
                access_log=False)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""An S3-compatible store for trying voxgate locally (deploy/compose.yaml): moto's server.

moto's own image lives on a registry this project cannot reach, so the compose file runs
this script in an image built from the voxgate base plus moto[server] wheels
(deploy/docker/s3.Dockerfile). It starts the server, creates the buckets named in
S3_BUCKETS (comma-separated) so the gateway finds its bucket at start-up, and serves
until SIGTERM. Everything is in memory: recordings die with the container. Not for
production; use a real S3-compatible service there.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import boto3
from moto.server import ThreadedMotoServer

PORT = int(os.environ.get("S3_PORT", "9000"))


def main() -> int:
    server = ThreadedMotoServer(ip_address="0.0.0.0", port=PORT, verbose=False)
    server.start()
    client = boto3.client(
        "s3", endpoint_url=f"http://127.0.0.1:{PORT}", region_name="us-east-1",
        aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "voxgate"),
        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "voxgate-secret"))
    for bucket in filter(None, os.environ.get("S3_BUCKETS", "").split(",")):
        client.create_bucket(Bucket=bucket.strip())
        print(f"s3: bucket {bucket.strip()} created", flush=True)
    print(f"s3: moto server on :{PORT}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

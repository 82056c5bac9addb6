#!/usr/bin/env python3
"""Container HEALTHCHECK for voxgate: GET http://127.0.0.1:PORT/PATH, exit 0 on 200.

    voxgate-healthcheck 8081            # gateway HTTP side, /healthz
    voxgate-healthcheck 8090 /readyz    # ASR service

When the plain request fails it tries HTTPS without verifying the certificate (the
ASR service serves TLS when ``[server] certfile`` is set; a probe of its own container
by IP cannot match any certificate name). Both services answer HTTP/1.1 on these
routes: the ASR service offers ALPN ``h2`` only over TLS, but a client that offers only
``http/1.1`` still gets HTTP/1.1. Standard library only.

Kubernetes ignores HEALTHCHECK; the Helm chart uses its own httpGet probes.
"""

from __future__ import annotations

import ssl
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 3.0


def check(port: int, path: str) -> str | None:
    """``None`` if the service answered 200, else why not."""
    problems = []
    for scheme in ("http", "https"):
        url = f"{scheme}://127.0.0.1:{port}{path}"
        context = ssl._create_unverified_context() if scheme == "https" else None
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_S, context=context) as resp:
                if resp.status == 200:
                    return None
                problems.append(f"{url}: status {resp.status}")
        except urllib.error.HTTPError as exc:  # the service answered, but not 200
            return f"{url}: status {exc.code}"
        except (OSError, ValueError) as exc:
            problems.append(f"{url}: {exc}")
    return "; ".join(problems)


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2 or not argv[0].isdigit():
        print("usage: voxgate-healthcheck PORT [PATH]", file=sys.stderr)
        return 2
    path = argv[1] if len(argv) == 2 else "/healthz"
    problem = check(int(argv[0]), path if path.startswith("/") else "/" + path)
    if problem:
        print(f"voxgate-healthcheck: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

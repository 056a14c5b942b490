"""The server image's health check: exit 0 when /readyz answers 200, else 1 with one line saying why.

Used by the Dockerfile's HEALTHCHECK and docker-compose.yml. Standard library only, so each probe
costs a bare interpreter start, not an import of CrossLM. While the LLM loads the server answers
503 (or is not listening yet): that is a normal "not ready", printed as one line, not a traceback.
Usage: python docker/healthcheck.py [URL]   (default http://127.0.0.1:8080/readyz)
"""
import sys
import urllib.error
import urllib.request

URL = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080/readyz"

try:
    with urllib.request.urlopen(URL, timeout=4) as answer:
        status = answer.status
except urllib.error.HTTPError as e:
    sys.exit(f"not ready: {URL} answered {e.code} {e.read(200).decode(errors='replace').strip()}")
except OSError as e:  # refused, reset or timed out: the server is not listening yet
    sys.exit(f"not ready: {URL}: {getattr(e, 'reason', e)}")
sys.exit(0 if status == 200 else f"not ready: {URL} answered {status}")

"""A loopback OTLP/HTTP traces receiver: a real HTTP server that decodes what it is sent
(``ExportTraceServiceRequest`` protobuf), or that takes a request and never answers."""

from __future__ import annotations

import http.server
import threading
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span


class Collector(http.server.ThreadingHTTPServer):
    """A loopback OTLP/HTTP traces receiver: decodes each POST's protobuf."""

    def __init__(self, hang: bool = False) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.hang = hang
        self.release = threading.Event()
        super().__init__(("127.0.0.1", 0), _CollectorHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1/traces"

    def spans(self) -> list[Span]:
        """Every span received, in the order received."""
        return _spans(self.requests)

    def close(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()


class _CollectorHandler(http.server.BaseHTTPRequestHandler):
    server: Collector
    protocol_version = "HTTP/1.1"  # keep-alive, as a collector answers the SDK's pool

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.server.hang:
            self.server.release.wait(30)
            return
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        self.server.requests.append(request)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _spans(requests: list[ExportTraceServiceRequest]) -> list[Span]:
    return [
        span
        for request in requests
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]


def main() -> None:
    """Serve from a process of its own (benchmarks): prints the port, runs until killed."""
    collector = Collector()
    print(collector.server_address[1], flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()

"""The core's statuses (HTTP's numbers) as gRPC status codes, and back for /metrics: one table."""
import grpc

CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
         403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
         409: grpc.StatusCode.FAILED_PRECONDITION, 410: grpc.StatusCode.NOT_FOUND,
         413: grpc.StatusCode.RESOURCE_EXHAUSTED, 499: grpc.StatusCode.CANCELLED, 503: grpc.StatusCode.UNAVAILABLE,
         504: grpc.StatusCode.DEADLINE_EXCEEDED}  # anything else INTERNAL
STATUSES = {code: status for status, code in CODES.items() if status != 410} | {grpc.StatusCode.INTERNAL: 500}


def code(status: int) -> grpc.StatusCode:
    return CODES.get(status, grpc.StatusCode.INTERNAL)


def counted(status: int) -> int:
    """The status a gRPC answer is counted with in /metrics: the one its code stands for."""
    return STATUSES[code(status)]

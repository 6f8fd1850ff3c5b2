"""The gRPC API's protocol: ``pdserve.proto`` and the stubs generated from it (committed).

Regenerate from the repository root after editing the ``.proto``::

    python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. serving/proto/pdserve.proto
"""

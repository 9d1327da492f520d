"""Generated protobuf and gRPC code for the wire schemas in proto/ (do not edit).

Regenerate with ``python scripts/gen_proto.py``; a test checks that these files are up to date.
"""

#!/usr/bin/env python3
"""A portal backend's side of vncdispatch, in Python with grpcio: proves the contract in
proto/ works outside Rust. Stubs are generated from proto/ at start (grpcio-tools), so this
always speaks the contract as it is in the tree.

    portal_client.py --dispatcher 127.0.0.1:7500 [--ca CA --cert CERT --key KEY] \
        [--secret-file F] [--request-id ID] dispatch USER REMOTE_IP | resolve TOKEN | end USER

With --ca/--cert/--key the call is mutual TLS: the portal presents its certificate (role
portal, from `dispatcher pki issue --role portal`) and checks the dispatcher's against the CA.

Prints the answer as one JSON object; on a gRPC error prints `CODE: message` to stderr and
exits 1.
"""
import argparse
import importlib
import json
import os
import sys
import tempfile

import grpc
from google.protobuf import json_format
from grpc_tools import protoc

PROTO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "proto")


def load_stubs(out_dir):
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    rc = protoc.main([
        "protoc", f"-I{PROTO_DIR}", f"-I{include}",
        f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
        "vncdispatch/v1/dispatcher.proto",
    ])
    if rc != 0:
        sys.exit(f"protoc failed on {PROTO_DIR}")
    sys.path.insert(0, out_dir)
    return (importlib.import_module("vncdispatch.v1.dispatcher_pb2"),
            importlib.import_module("vncdispatch.v1.dispatcher_pb2_grpc"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dispatcher", required=True, help="host:port of the dispatcher")
    ap.add_argument("--secret-file", help="the dispatcher's API secret, if it requires one")
    ap.add_argument("--ca", help="CA bundle (PEM) the dispatcher's certificate must chain to")
    ap.add_argument("--cert", help="this portal's certificate (PEM, role portal)")
    ap.add_argument("--key", help="this portal's private key (PEM)")
    ap.add_argument("--request-id", help="x-request-id to send (follows the call to the blade)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dispatch")
    d.add_argument("username")
    d.add_argument("remote_ip")
    r = sub.add_parser("resolve")
    r.add_argument("token")
    e = sub.add_parser("end")
    e.add_argument("username")
    args = ap.parse_args()
    tls = [args.ca, args.cert, args.key]
    if any(tls) and not all(tls):
        ap.error("--ca, --cert and --key go together")

    metadata = []
    if args.secret_file:
        with open(args.secret_file) as f:
            metadata.append(("authorization", "Bearer " + f.read().strip()))
    if args.request_id:
        metadata.append(("x-request-id", args.request_id))

    with tempfile.TemporaryDirectory() as out:
        pb, pb_grpc = load_stubs(out)
        if all(tls):
            def read(path):
                with open(path, "rb") as f:
                    return f.read()
            creds = grpc.ssl_channel_credentials(
                root_certificates=read(args.ca),
                private_key=read(args.key),
                certificate_chain=read(args.cert))
            channel = grpc.secure_channel(args.dispatcher, creds)
        else:
            channel = grpc.insecure_channel(args.dispatcher)
        with channel:
            stub = pb_grpc.DispatcherStub(channel)
            try:
                if args.cmd == "dispatch":
                    req = pb.DispatchRequest(username=args.username, remote_ip=args.remote_ip)
                    reply = stub.Dispatch(req, metadata=metadata, timeout=60)
                elif args.cmd == "resolve":
                    reply = stub.ResolveToken(pb.ResolveTokenRequest(token=args.token),
                                              metadata=metadata, timeout=10)
                else:
                    reply = stub.EndSession(pb.EndSessionRequest(username=args.username),
                                            metadata=metadata, timeout=30)
            except grpc.RpcError as err:
                print(f"{err.code().name}: {err.details()}", file=sys.stderr)
                return 1
    print(json.dumps(json_format.MessageToDict(reply, preserving_proto_field_name=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

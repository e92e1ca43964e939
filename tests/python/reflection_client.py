"""A gRPC client in another language that knows only Nembo's public names.

It learns every message type from the coordinator's server reflection (no
.proto files, no generated code), submits a task YAML, waits for JOB_STATE_SUCCEEDED
and reads the job's logs. Usage: reflection_client.py API_INFO_JSON
"""
import json
import sys
import time

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

SERVICE = "nembo.v1.CoordinatorService"


def main(api_info_path: str) -> None:
    info = json.load(open(api_info_path))
    ca = open(info["ca_cert_path"], "rb").read()
    token = open(info["token_path"]).read().strip()
    target = info["endpoint"].removeprefix("https://")
    channel = grpc.secure_channel(
        target,
        grpc.ssl_channel_credentials(root_certificates=ca),
        options=[("grpc.ssl_target_name_override", "localhost")],
    )
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    service = pool.FindServiceByName(SERVICE)
    auth = [("authorization", f"Bearer {token}")]

    def method(name, streaming=False):
        m = service.methods_by_name[name]
        req = message_factory.GetMessageClass(m.input_type)
        resp = message_factory.GetMessageClass(m.output_type)
        make = channel.unary_stream if streaming else channel.unary_unary
        call = make(f"/{SERVICE}/{name}", request_serializer=req.SerializeToString,
                    response_deserializer=resp.FromString)
        return req, call

    submit_req, submit = method("SubmitJob")
    get_req, get_job = method("GetJob")
    logs_req, stream_logs = method("StreamLogs", streaming=True)

    job_id = submit(submit_req(task_yaml="name: from-python\nrun: echo hello from $NEMBO_JOB_ID via reflection\n",
                               idempotency_key="python-1"), metadata=auth).job_id
    state_enum = pool.FindEnumTypeByName("nembo.v1.JobState")
    succeeded = state_enum.values_by_name["JOB_STATE_SUCCEEDED"].number
    deadline = time.time() + 30
    while True:
        job = get_job(get_req(job_id=job_id), metadata=auth).job
        if job.state == succeeded:
            break
        if time.time() > deadline:
            sys.exit(f"job {job_id} stuck in {state_enum.values_by_number[job.state].name}")
        time.sleep(0.1)
    out = b"".join(c.data for c in stream_logs(logs_req(job_id=job_id, follow=True), metadata=auth))
    expected = f"hello from {job_id} via reflection"
    if expected.encode() not in out:
        sys.exit(f"logs lack {expected!r}: {out!r}")
    try:
        get_job(get_req(job_id=job_id), metadata=[("authorization", "Bearer wrong")])
        sys.exit("a wrong token was accepted")
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.UNAUTHENTICATED:
            sys.exit(f"wrong token gave {e.code()}")
    print(f"ok: job {job_id} SUCCEEDED; logs: {out.decode().strip()}")


if __name__ == "__main__":
    main(sys.argv[1])

"""gRPC bearer token, TLS with a self-signed certificate made here, the plaintext health-only port, and the
overload / deadline statuses, against real servers on loopback."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from bench.ports import free_port
from proto import classifier_pb2, classifier_pb2_grpc
from proto import grpc_predict_v2_pb2 as pb
from proto import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.test_grpc import Served, fails, need_models, png, settings_for, trailing

TOKEN = "s3cret-token"


def digit() -> bytes:
    img = Image.new("L", (28, 28), 0)
    img.paste(255, (12, 4, 16, 24))
    return png(img)


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    s = Served(settings_for(need_models(), models=("lenet5",), default_model="lenet5", auth_token=TOKEN))
    yield s
    s.close()


def self_signed(folder: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "server.crt", folder / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def test_token_required_for_classify_and_infer(served: Served) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{served.server.port}") as ch:
        stub = classifier_pb2_grpc.ImageClassifierStub(ch)
        request = classifier_pb2.ClassifyRequest(image=digit())
        err = fails(
            stub.Classify, request, grpc.StatusCode.UNAUTHENTICATED, metadata=(("x-request-id", "r1"),)
        )
        assert trailing(err)["x-request-id"] == "r1" and "r1" in err.details()
        for header in ("Bearer wrong", f"Basic {TOKEN}", TOKEN):
            fails(
                stub.Classify, request, grpc.StatusCode.UNAUTHENTICATED, metadata=(("authorization", header),)
            )
        ok = stub.Classify(request, timeout=30, metadata=(("authorization", f"Bearer {TOKEN}"),))
        assert ok.result.model == "lenet5"
        oip = pb_grpc.GRPCInferenceServiceStub(ch)
        fails(oip.ModelMetadata, pb.ModelMetadataRequest(name="lenet5"), grpc.StatusCode.UNAUTHENTICATED)
        # Liveness and readiness need no token (probes send none).
        assert oip.ServerReady(pb.ServerReadyRequest(), timeout=10).ready


def test_health_needs_no_token_reflection_does(served: Served) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{served.server.port}") as ch:
        check = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="lenet5"), timeout=10
        )
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(ch)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as info:
            list(reflect.ServerReflectionInfo(iter([request]), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answers = list(
            reflect.ServerReflectionInfo(
                iter([request]), timeout=10, metadata=(("authorization", f"Bearer {TOKEN}"),)
            )
        )
        assert any(s.name == "cnnserve.v1.ImageClassifier" for s in answers[0].list_services_response.service)


def test_tls_and_plaintext_health_port(served: Served, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    health_port = free_port()
    server = served.add(
        served.settings.replace(grpc_tls_cert=str(cert), grpc_tls_key=str(key), grpc_health_port=health_port)
    )
    assert server.health_port == health_port
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    with grpc.secure_channel(f"localhost:{server.port}", credentials) as ch:
        stub = classifier_pb2_grpc.ImageClassifierStub(ch)
        response = stub.Classify(
            classifier_pb2.ClassifyRequest(image=digit(), top_k=2),
            timeout=30,
            metadata=(("authorization", f"Bearer {TOKEN}"),),
        )
        assert len(response.result.predictions) == 2
    # Plaintext on the TLS port does not get through.
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        fails(
            health_pb2_grpc.HealthStub(ch).Check, health_pb2.HealthCheckRequest(), grpc.StatusCode.UNAVAILABLE
        )
    # The plaintext port serves health, no token, and nothing else.
    with grpc.insecure_channel(f"127.0.0.1:{health_port}") as ch:
        check = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        fails(
            classifier_pb2_grpc.ImageClassifierStub(ch).Classify,
            classifier_pb2.ClassifyRequest(image=digit()),
            grpc.StatusCode.UNIMPLEMENTED,
            metadata=(("authorization", f"Bearer {TOKEN}"),),
        )


def test_overload_is_resource_exhausted_and_deadline_is_deadline_exceeded(tmp_path: Path) -> None:
    s = Served(
        settings_for(
            need_models(),
            models=("lenet5",),
            default_model="lenet5",
            queue_size=80,
            max_batch_size=1,
            decode_threads=1,
        )
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{s.server.port}") as ch:
            stub = classifier_pb2_grpc.ImageClassifierStub(ch)
            # More views than the whole queue holds could never be admitted: a client error, not a retry.
            too_many = classifier_pb2.ClassifyBatchRequest(images=[digit()] * 9, tta="ten_crop")
            err = fails(stub.ClassifyBatch, too_many, grpc.StatusCode.INVALID_ARGUMENT)
            assert "90 views in one request; the queue holds 80 views" in err.details()
            request = classifier_pb2.ClassifyBatchRequest(images=[digit()] * 8, tta="ten_crop")

            def call(_: int) -> grpc.StatusCode:
                try:
                    stub.ClassifyBatch(request, timeout=60)
                    return grpc.StatusCode.OK
                except grpc.RpcError as err:
                    if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        assert trailing(err)["retry-after"] and trailing(err)["x-request-id"]
                    return err.code()

            with ThreadPoolExecutor(16) as pool:
                codes = list(pool.map(call, range(32)))
            assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes, codes
            assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    finally:
        s.close()
    s = Served(
        settings_for(need_models(), models=("lenet5",), default_model="lenet5", request_timeout_s=1e-6)
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{s.server.port}") as ch:
            stub = classifier_pb2_grpc.ImageClassifierStub(ch)
            err = fails(
                stub.Classify,
                classifier_pb2.ClassifyRequest(image=digit()),
                grpc.StatusCode.DEADLINE_EXCEEDED,
            )
            # No message arrives within a microsecond of its call's headers: the call's deadline passed first.
            assert trailing(err)["x-error-code"] == "request_timeout"
            assert "the request message did not arrive within" in err.details()
    finally:
        s.close()


def test_one_interceptor_refuses_servicers_and_reflection_alike(served: Served) -> None:
    """The token rule is applied in one place for every method: a servicer's and reflection's refusals are
    the same UNAUTHENTICATED, with the request id and `x-error-code`, and both are counted; health and the
    probes stay open and still echo the request id, an error of health's own included."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    metadata = (("x-request-id", "no-token-7"), ("authorization", "Bearer wrong"))
    with grpc.insecure_channel(f"127.0.0.1:{served.server.port}") as ch:
        refused = [
            fails(
                classifier_pb2_grpc.ImageClassifierStub(ch).ListModels,
                classifier_pb2.ListModelsRequest(),
                grpc.StatusCode.UNAUTHENTICATED,
                metadata=metadata,
            ),
            fails(
                pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer,
                pb.ModelInferRequest(model_name="lenet5"),
                grpc.StatusCode.UNAUTHENTICATED,
                metadata=metadata,
            ),
        ]
        reflect = reflection_pb2_grpc.ServerReflectionStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            list(
                reflect.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                    timeout=10,
                    metadata=metadata,
                )
            )
        refused.append(info.value)
        for err in refused:
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            assert err.details() == (
                "missing or wrong bearer token in 'authorization' metadata (request id no-token-7)"
            )
            meta = trailing(err)
            assert meta["x-request-id"] == "no-token-7" and meta["x-error-code"] == "unauthenticated"
        health = health_pb2_grpc.HealthStub(ch)
        _, call = health.Check.with_call(
            health_pb2.HealthCheckRequest(service="lenet5"),
            metadata=(("x-request-id", "probe-1"),),
            timeout=10,
        )
        assert trailing(call)["x-request-id"] == "probe-1"
        err = fails(
            health.Check,
            health_pb2.HealthCheckRequest(service="nope"),
            grpc.StatusCode.NOT_FOUND,
            metadata=(("x-request-id", "probe-2"),),
        )
        assert trailing(err)["x-request-id"] == "probe-2"
        _, call = pb_grpc.GRPCInferenceServiceStub(ch).ServerLive.with_call(
            pb.ServerLiveRequest(), metadata=(("x-request-id", "probe-3"),), timeout=10
        )
        assert trailing(call)["x-request-id"] == "probe-3"
    text = generate_latest(served.metrics.registry).decode()
    counted = {
        s.labels["endpoint"]
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "cnn_serve_requests_total"
        and s.labels["protocol"] == "grpc"
        and s.labels["status"] == "UNAUTHENTICATED"
    }
    assert {"ListModels", "ModelInfer", "ServerReflectionInfo"} <= counted

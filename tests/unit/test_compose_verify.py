"""Verification of a resolved Compose model and of image repository digests."""

from __future__ import annotations

import pytest

from stella_agent.errors import DigestMismatchError, InvalidTaskError
from stella_agent.executors.compose_verify import (
    ServicePlan,
    check_repo_digests,
    normalize_repository,
    split_pinned_image,
    validate_expected_digests,
    verify_model,
)

WEB = "sha256:" + "1" * 64
WORKER = "sha256:" + "2" * 64
OTHER = "sha256:" + "f" * 64
REGISTRY = "127.0.0.1:5000/shop"


def model(**services) -> dict:
    return {"name": "shop", "services": services}


def pinned(repository: str, digest: str, **extra) -> dict:
    return {"image": f"{REGISTRY}/{repository}@{digest}", **extra}


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (f"{REGISTRY}/web@{WEB}", (f"{REGISTRY}/web", WEB)),
        (f"{REGISTRY}/web:v1@{WEB}", (f"{REGISTRY}/web", WEB)),
        (f"nginx@{WEB}", ("nginx", WEB)),
        (f"localhost:5000/web@{WEB}", ("localhost:5000/web", WEB)),
        (f"localhost:5000/web:1.2@{WEB}", ("localhost:5000/web", WEB)),
        (f"{REGISTRY}/web:v1", None),
        (f"{REGISTRY}/web", None),
        (f"{REGISTRY}/web@sha256:abc", None),
        (f"{REGISTRY}/web@sha512:{'1' * 128}", None),
        (f"{REGISTRY}/web@{WEB.upper()}", None),
    ],
)
def test_split_pinned_image(image, expected):
    assert split_pinned_image(image) == expected


@pytest.mark.parametrize(
    ("repository", "normalized"),
    [
        ("nginx", "docker.io/library/nginx"),
        ("library/nginx", "docker.io/library/nginx"),
        ("docker.io/nginx", "docker.io/library/nginx"),
        ("index.docker.io/library/nginx", "docker.io/library/nginx"),
        ("me/app", "docker.io/me/app"),
        ("127.0.0.1:5000/web", "127.0.0.1:5000/web"),
        ("localhost/web", "localhost/web"),
        ("ghcr.io/me/app", "ghcr.io/me/app"),
    ],
)
def test_normalize_repository(repository, normalized):
    assert normalize_repository(repository) == normalized


def test_verify_model_accepts_pinned_stack():
    resolved = model(web=pinned("web", WEB), worker=pinned("worker", WORKER))

    plans = verify_model(resolved, {"web": WEB, "worker": WORKER})

    assert plans["web"] == ServicePlan(
        "web", f"{REGISTRY}/web", WEB, one_shot=False, replicas=1
    )
    assert plans["worker"].pull_reference == f"{REGISTRY}/worker@{WORKER}"


def test_verify_model_rejects_unpinned_image():
    resolved = model(web={"image": f"{REGISTRY}/web:v1"})

    with pytest.raises(InvalidTaskError, match="not pinned by digest"):
        verify_model(resolved, {"web": WEB})


def test_verify_model_rejects_wrong_digest():
    resolved = model(web=pinned("web", OTHER), worker=pinned("worker", WORKER))

    with pytest.raises(DigestMismatchError) as raised:
        verify_model(resolved, {"web": WEB, "worker": WORKER})

    assert OTHER in raised.value.message
    assert "'web'" in raised.value.message


def test_verify_model_rejects_unexpected_service():
    resolved = model(web=pinned("web", WEB), sidecar=pinned("worker", WORKER))

    with pytest.raises(InvalidTaskError, match="'sidecar' is not in expected_digests"):
        verify_model(resolved, {"web": WEB})


def test_verify_model_rejects_missing_service():
    resolved = model(web=pinned("web", WEB))

    with pytest.raises(
        InvalidTaskError,
        match="'worker' is in expected_digests but not in the lock file",
    ):
        verify_model(resolved, {"web": WEB, "worker": WORKER})


def test_verify_model_rejects_build_section():
    resolved = model(web=pinned("web", WEB, build={"context": "."}))

    with pytest.raises(InvalidTaskError, match="build section"):
        verify_model(resolved, {"web": WEB})


def test_verify_model_rejects_service_without_image():
    resolved = model(web={"command": ["true"]})

    with pytest.raises(InvalidTaskError, match="has no image"):
        verify_model(resolved, {"web": WEB})


def test_verify_model_rejects_empty_model():
    with pytest.raises(InvalidTaskError, match="no services"):
        verify_model({"name": "shop"}, {"web": WEB})


def test_verify_model_reports_every_problem():
    resolved = model(web={"image": "web:latest"}, extra=pinned("worker", WORKER))

    with pytest.raises(InvalidTaskError) as raised:
        verify_model(resolved, {"web": WEB, "gone": WORKER})

    for fragment in ("'gone'", "'extra'", "'web'"):
        assert fragment in raised.value.message


def test_verify_model_detects_one_shot_services():
    resolved = model(
        web=pinned(
            "web",
            WEB,
            depends_on={
                "migrate": {
                    "condition": "service_completed_successfully",
                    "required": True,
                },
                "cache": {"condition": "service_started"},
            },
        ),
        migrate=pinned("worker", WORKER),
        cache=pinned("worker", WORKER),
        job=pinned("worker", WORKER, restart="no"),
        daemon=pinned("worker", WORKER, restart="always"),
    )
    expected = {
        "web": WEB,
        "migrate": WORKER,
        "cache": WORKER,
        "job": WORKER,
        "daemon": WORKER,
    }

    plans = verify_model(resolved, expected)

    assert {name for name, plan in plans.items() if plan.one_shot} == {"migrate", "job"}


@pytest.mark.parametrize(
    ("extra", "replicas"),
    [
        ({}, 1),
        ({"deploy": {"replicas": 3}}, 3),
        ({"scale": 2}, 2),
        ({"deploy": {"replicas": 0}}, 0),
    ],
)
def test_verify_model_reads_replicas(extra, replicas):
    plans = verify_model(model(web=pinned("web", WEB, **extra)), {"web": WEB})

    assert plans["web"].replicas == replicas


def test_expected_digests_required():
    with pytest.raises(InvalidTaskError, match="expected_digests is required"):
        validate_expected_digests({})


def test_expected_digests_must_be_valid():
    with pytest.raises(InvalidTaskError, match="expected_digests"):
        validate_expected_digests({"web": "sha256:short"})


def test_repo_digests_match_normalized_name():
    plan = ServicePlan(
        "web", "docker.io/library/nginx", WEB, one_shot=False, replicas=1
    )

    check_repo_digests({"RepoDigests": [f"nginx@{WEB}"]}, plan)


def test_repo_digests_mismatch_raises():
    plan = ServicePlan("web", f"{REGISTRY}/web", WEB, one_shot=False, replicas=1)

    with pytest.raises(DigestMismatchError, match="possible tampering"):
        check_repo_digests(
            {"RepoDigests": [f"{REGISTRY}/web@{OTHER}", f"{REGISTRY}/other@{WEB}"]},
            plan,
        )


def test_repo_digests_missing_raises():
    plan = ServicePlan("web", f"{REGISTRY}/web", WEB, one_shot=False, replicas=1)

    with pytest.raises(DigestMismatchError, match="none"):
        check_repo_digests({"RepoDigests": None}, plan)

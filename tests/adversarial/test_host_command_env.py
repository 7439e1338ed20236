"""Host commands: the allowlist names the only programs the host may run, so
the task's environment must not be able to make an allowed program load or
run anything else."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.integration.task_support import TaskAgent
from tests.integration.test_task_types import host_task

pytestmark = pytest.mark.docker

PRELOAD_SOURCE = r"""
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>
__attribute__((constructor)) static void planted(void) {
    const char *marker = getenv("STELLA_MARKER");
    if (marker) { int fd = open(marker, O_CREAT | O_WRONLY, 0600); if (fd >= 0) close(fd); }
}
"""


def test_host_command_ld_preload(tmp_path, test_images):
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the shared object")
    source = tmp_path / "planted.c"
    source.write_text(PRELOAD_SOURCE)
    library = tmp_path / "planted.so"
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-o", str(library), str(source)],
        check=True,
        timeout=60,
    )
    marker = tmp_path / "marker"
    agent = TaskAgent(
        tmp_path,
        test_images["tools:v1"].reference,
        tasks={"allow_host_commands": True, "host_command_allowlist": ["/bin/echo"]},
    )

    result = agent.run(
        host_task(
            "adv-preload",
            "/bin/echo",
            "hello",
            environment={"LD_PRELOAD": str(library), "STELLA_MARKER": str(marker)},
        )
    )

    # The planted code never runs; a refusal names the variable.
    assert not marker.exists(), (
        "code from the planted shared object ran through /bin/echo: "
        f"{result.success=} {result.error!r}"
    )
    if not result.success:
        assert "LD_PRELOAD" in result.error, result.error

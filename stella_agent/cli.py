"""The `stella-agent` command line.

stella-agent run --config agent.yaml         run the agent
stella-agent exec TASK_FILE                  run one task locally, no orchestrator
stella-agent orchestrator --certs DIR        run the reference orchestrator
stella-agent submit TASK_FILE --agent ID     send a task through it and follow it
stella-agent agents                          list connected agents
stella-agent certs init --dir DIR --agent-id ID
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from google.protobuf import json_format

from stella_agent import __version__
from stella_agent.errors import StellaError

EXIT_TASK_FAILED = 1
EXIT_USAGE = 2


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _result_json(result) -> str:
    # success and retriable are printed even when false.
    return json_format.MessageToJson(
        result,
        preserving_proto_field_name=True,
        indent=2,
        always_print_fields_with_no_presence=True,
    )


def cmd_run(args: argparse.Namespace) -> int:
    from stella_agent.agent import run_agent
    from stella_agent.config import load_config

    config = load_config(args.config)
    _configure_logging(config.log_level)
    return asyncio.run(run_agent(config))


def cmd_exec(args: argparse.Namespace) -> int:
    from stella_agent.agent import build_executors, docker_client_factory
    from stella_agent.config import config_from_mapping, load_config
    from stella_agent.runner import TaskRunner
    from stella_agent.tasks import load_task_file

    _configure_logging(args.log_level)
    if args.config:
        config = load_config(args.config)
    else:
        config = config_from_mapping({"agent_id": "local", "state_dir": args.state_dir})
    task = load_task_file(args.task_file)
    if not task.id:
        task.id = "local-" + Path(args.task_file).stem

    def sink(chunk) -> None:
        sys.stderr.buffer.write(chunk.data)
        sys.stderr.buffer.flush()

    async def main():
        runner = TaskRunner(
            config, build_executors(config), docker_client_factory(config)
        )
        return await runner.run(runner.new_context(task, sink))

    result = asyncio.run(main())
    print(_result_json(result))
    return 0 if result.success else EXIT_TASK_FAILED


def cmd_orchestrator(args: argparse.Namespace) -> int:
    from stella_agent.orchestrator.server import OrchestratorConfig, serve

    _configure_logging(args.log_level)
    certs = Path(args.certs)
    config = OrchestratorConfig(
        listen=args.listen,
        ca_file=args.ca or str(certs / "ca.crt"),
        cert_file=args.cert or str(certs / "orchestrator.crt"),
        key_file=args.key or str(certs / "orchestrator.key"),
        operator_identities=frozenset(args.operator)
        if args.operator
        else frozenset({"stella-operator"}),
        heartbeat_interval=args.heartbeat_interval,
        signing_key_file=args.signing_key or "",
    )
    asyncio.run(serve(config))
    return 0


def _operator_client(args: argparse.Namespace):
    from stella_agent.orchestrator.client import ControlClient

    certs = Path(args.certs)
    return ControlClient(
        args.address,
        ca_file=args.ca or str(certs / "ca.crt"),
        cert_file=args.cert or str(certs / "operator.crt"),
        key_file=args.key or str(certs / "operator.key"),
        server_name=args.server_name,
    )


def cmd_submit(args: argparse.Namespace) -> int:
    from stella_agent.orchestrator.client import (
        load_credentials_file,
        parse_artifact_args,
    )
    from stella_agent.tasks import load_task_file

    _configure_logging(args.log_level)
    task = load_task_file(args.task_file)
    artifacts = parse_artifact_args(args.artifact)
    credentials = load_credentials_file(args.credentials) if args.credentials else None

    def on_log(chunk) -> None:
        sys.stderr.buffer.write(chunk.data)
        sys.stderr.buffer.flush()

    async def main():
        async with _operator_client(args) as client:
            task_id = await client.submit(args.agent, task, artifacts, credentials)
            print(f"submitted task {task_id} to agent {args.agent}", file=sys.stderr)
            connected = [a.agent_id for a in (await client.list_agents()).agents]
            if args.agent not in connected:
                print(
                    f"agent {args.agent} is not connected now, so the task waits until it "
                    f"connects; connected agents: {', '.join(connected) or 'none'}",
                    file=sys.stderr,
                )
            if args.no_wait:
                return None, task_id
            return await client.follow(
                task_id, on_log=on_log, timeout=args.timeout
            ), task_id

    result, task_id = asyncio.run(main())
    if result is None:
        print(task_id)
        return 0
    if not args.no_wait:
        # The log was streamed above; the result's tail of it would repeat it.
        result.ClearField("logs")
    print(_result_json(result))
    return 0 if result.success else EXIT_TASK_FAILED


def cmd_agents(args: argparse.Namespace) -> int:
    _configure_logging(args.log_level)

    async def main():
        async with _operator_client(args) as client:
            return await client.list_agents()

    response = asyncio.run(main())
    print(
        json_format.MessageToJson(response, preserving_proto_field_name=True, indent=2)
    )
    return 0


def cmd_certs_init(args: argparse.Namespace) -> int:
    from stella_agent.certs import init_dev_pki

    files = init_dev_pki(args.dir, args.agent_id)
    for label, path in vars(files).items():
        print(f"{label:18} {path}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from stella_agent.checks import format_results, run_checks
    from stella_agent.config import load_config

    _configure_logging(args.log_level)
    results = run_checks(load_config(args.config))
    print(format_results(results))
    return 0 if all(result.ok for result in results) else EXIT_TASK_FAILED


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from stella_agent.audit import AUDIT_FILE, verify_audit_log
    from stella_agent.config import load_config

    if args.file:
        path = Path(args.file)
    elif args.config:
        path = load_config(args.config).state_path / AUDIT_FILE
    else:
        print("stella-agent: error: give --config or --file", file=sys.stderr)
        return EXIT_USAGE
    problems = verify_audit_log(path)
    for problem in problems:
        print(problem)
    if problems:
        print(
            f"{path}: {len(problems)} problem(s); the audit log was altered",
            file=sys.stderr,
        )
        return EXIT_TASK_FAILED
    print(f"{path}: intact")
    return 0


def cmd_keys_signing(args: argparse.Namespace) -> int:
    from stella_agent.signing import generate_signing_key

    files = generate_signing_key(args.path)
    for label, value in vars(files).items():
        print(f"{label:12} {value}")
    return 0


def _add_operator_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default="127.0.0.1:7443",
        help="orchestrator host:port (default %(default)s)",
    )
    parser.add_argument(
        "--certs",
        default="certs",
        help="directory of ca.crt, operator.crt and operator.key (default %(default)s)",
    )
    parser.add_argument(
        "--ca", help="CA bundle of the orchestrator's certificate (overrides --certs)"
    )
    parser.add_argument(
        "--cert", help="operator client certificate (overrides --certs)"
    )
    parser.add_argument("--key", help="operator client key (overrides --certs)")
    parser.add_argument(
        "--server-name",
        default="",
        help="name expected in the orchestrator's certificate",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stella-agent", description="Stella deployment agent"
    )
    parser.add_argument(
        "--version", action="version", version=f"stella-agent {__version__}"
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        help="level of the log on stderr (default %(default)s)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the agent")
    run.add_argument("--config", required=True, help="path of the agent's YAML config")
    run.set_defaults(func=cmd_run)

    exec_ = commands.add_parser(
        "exec", help="run one task locally against Docker and print its result"
    )
    exec_.add_argument("task_file", help="AgentTask as JSON or YAML")
    exec_.add_argument("--config", help="agent config to take settings from")
    exec_.add_argument(
        "--state-dir",
        default="/var/lib/stella-agent",
        help="state directory without --config (default %(default)s)",
    )
    exec_.set_defaults(func=cmd_exec)

    orchestrator = commands.add_parser(
        "orchestrator", help="run the reference orchestrator"
    )
    orchestrator.add_argument(
        "--listen",
        default="127.0.0.1:7443",
        help="address to listen on (default %(default)s)",
    )
    orchestrator.add_argument(
        "--certs",
        default="certs",
        help="directory of ca.crt, orchestrator.crt and orchestrator.key",
    )
    orchestrator.add_argument(
        "--ca", help="CA bundle that signs agent and operator certificates"
    )
    orchestrator.add_argument("--cert", help="server certificate")
    orchestrator.add_argument("--key", help="server key")
    orchestrator.add_argument(
        "--operator",
        action="append",
        help="certificate identity allowed to use ControlService (repeatable; default stella-operator)",
    )
    orchestrator.add_argument(
        "--heartbeat-interval",
        type=float,
        default=10.0,
        help="seconds between agent heartbeats (default %(default)s)",
    )
    orchestrator.add_argument(
        "--signing-key", help="Ed25519 private key (PEM) to sign every task with"
    )
    orchestrator.set_defaults(func=cmd_orchestrator)

    submit = commands.add_parser(
        "submit", help="send a task to an agent through the orchestrator"
    )
    submit.add_argument("task_file", help="AgentTask as JSON or YAML")
    submit.add_argument("--agent", required=True, help="id of the agent to run it")
    submit.add_argument(
        "--artifact",
        action="append",
        default=[],
        help="artifact content as NAME=PATH or PATH (repeatable)",
    )
    submit.add_argument(
        "--credentials", help="YAML or JSON file of Credentials to seal to the agent"
    )
    submit.add_argument(
        "--no-wait", action="store_true", help="print the task id and return at once"
    )
    submit.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        help="seconds to wait for the result (default %(default)s)",
    )
    _add_operator_options(submit)
    submit.set_defaults(func=cmd_submit)

    agents = commands.add_parser(
        "agents", help="list the agents connected to the orchestrator"
    )
    _add_operator_options(agents)
    agents.set_defaults(func=cmd_agents)

    check = commands.add_parser(
        "check", help="check certificates, key and the connection to the orchestrator"
    )
    check.add_argument(
        "--config", required=True, help="path of the agent's YAML config"
    )
    check.set_defaults(func=cmd_check)

    audit = commands.add_parser("audit", help="the agent's audit log")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_commands.add_parser(
        "verify", help="detect edited, deleted or reordered audit records"
    )
    verify.add_argument(
        "--config", help="agent config whose state_dir contains audit.log"
    )
    verify.add_argument("--file", help="audit log file to verify")
    verify.set_defaults(func=cmd_audit_verify)

    keys = commands.add_parser("keys", help="orchestrator signing keys")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    signing = keys_commands.add_parser(
        "signing", help="create an Ed25519 signing key and its public key (PATH.pub)"
    )
    signing.add_argument("path", help="file to write the private key to")
    signing.set_defaults(func=cmd_keys_signing)

    certs = commands.add_parser("certs", help="development certificates")
    certs_commands = certs.add_subparsers(dest="certs_command", required=True)
    init = certs_commands.add_parser(
        "init", help="create a development CA and certificates"
    )
    init.add_argument("--dir", required=True, help="directory to write them to")
    init.add_argument(
        "--agent-id",
        required=True,
        help="agent id, written as the client certificate's common name",
    )
    init.set_defaults(func=cmd_certs_init)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except StellaError as exc:
        print(f"stella-agent: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

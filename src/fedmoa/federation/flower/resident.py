"""A long-lived ClientApp process, so that a SuperNode keeps its model loaded across messages.

In flwr 1.42 a SuperNode's ``flower-superexec`` starts one ``flwr-clientapp`` process
per message, which pulls that one task and exits: every ``train`` and ``evaluate``
message would build the model again. A SuperNode started with ``--isolation process``
launches nothing; this process does what ``flower-superexec`` and ``flwr-clientapp`` do
between them, in a loop and in one process: acquire the next ClientApp task from the
SuperNode's Runtime API, pull its message and context, run fedmoa's ClientApp, push the
reply and the context back. The model built for the first message serves every later
one of the run (``fedmoa.federation.flower.node``).

It runs fedmoa's ClientApp whatever the run's FAB holds, and installs nothing.
Started as ``fedmoa clientapp --runtime-api-address HOST:PORT``.
"""

from __future__ import annotations

import logging
import time

from flwr.app import Error, Message
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import (
    pull_task_input,
    push_message,
    push_task_output,
)

from fedmoa.federation.flower.client_app import app as client_app

logger = logging.getLogger(__name__)


def _runtime_client(address: str, *interceptors: object) -> RuntimeHttpClient:
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,
        root_certificates=None,
        interceptors=list(interceptors),
        retry_invoker=make_simple_http_retry_invoker(),
    )


def serve_clientapp(
    runtime_api_address: str, *, poll_interval: float = 0.2, max_tasks: int | None = None
) -> int:
    """Run the SuperNode's ClientApp tasks as they come, until stopped (or ``max_tasks``);
    returns the number of tasks run."""
    acquirer = _runtime_client(
        runtime_api_address, RuntimeVersionHttpInterceptor(component_name="SuperExec")
    )
    done = 0
    try:
        while max_tasks is None or done < max_tasks:
            acquired = acquirer.AcquireTask(
                AcquireTaskRequest(
                    supported_task_types=[TaskType.CLIENT_APP], agentapp_fab_hashes=[]
                )
            )
            if acquired.HasField("task") and acquired.token:
                run_task(runtime_api_address, acquired.token)
                done += 1
            else:
                time.sleep(poll_interval)
    finally:
        acquirer.close()
    return done


def run_task(runtime_api_address: str, token: str) -> None:
    """One task, as ``flwr-clientapp`` runs it (pull, call the ClientApp, push), minus the
    FAB install and the process exit; an exception becomes an error reply, as there."""
    client = _runtime_client(
        runtime_api_address,
        RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
        RuntimeTokenHttpInterceptor(token),
    )
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    context = None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    try:
        message, context, _, _ = pull_task_input(client)
        began = time.perf_counter()
        try:
            reply = client_app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
            logger.info(
                "%s message of run %d: %.2f s",
                message.metadata.message_type,
                message.metadata.run_id,
                time.perf_counter() - began,
            )
        except Exception as err:  # the node lives on; the server logs the reply's reason
            details = f"{type(err)}:<'{err}'>"
            logger.exception("ClientApp raised an exception")
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details),
                reply_to=message,
            )
        push_message(client, reply, context)
    except Exception:  # the SuperNode went away or the task expired: wait for the next one
        logger.exception("ClientApp task could not be pulled or pushed")
    finally:
        push_task_output(client=client, context=context, sub_status=status, details=details)
        heartbeat.stop()
        client.close()

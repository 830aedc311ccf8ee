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
from collections.abc import Callable
from typing import Any

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


OBJECT_WAIT = 120.0
"""Seconds a task's message may stay unavailable before the task is given up.

A message whose run ended after the SuperNode received it (a ServerApp that died) never
becomes available: the SuperLink refuses its objects. ``flwr-clientapp`` waits for it up to
two hours (``PULL_MAX_TIME``), and its process is then stopped with the run; a resident
process must give it up instead, or every later run waits behind it."""


def serve_clientapp(
    runtime_api_address: str,
    *,
    poll_interval: float = 0.2,
    max_tasks: int | None = None,
    object_wait: float = OBJECT_WAIT,
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
                run_task(runtime_api_address, acquired.token, object_wait)
                done += 1
            else:
                time.sleep(poll_interval)
    finally:
        acquirer.close()
    return done


class MessageGone(Exception):
    """A task's message stayed unavailable for longer than ``object_wait``."""


def bounded_pull(pull: Callable[[Any], Any], object_wait: float) -> Callable[[Any], Any]:
    """``pull`` (a Runtime API ``PullObject``) that fails for good once its objects have been
    unavailable for ``object_wait`` seconds in a row; flwr retries any other error-free miss."""
    missing_since: float | None = None

    def pull_object(request: Any) -> Any:
        nonlocal missing_since
        response = pull(request)
        if response.object_available:
            missing_since = None
        else:
            missing_since = missing_since or time.monotonic()
            if time.monotonic() - missing_since > object_wait:
                raise MessageGone(
                    f"run {request.run_id}: its message did not arrive within {object_wait:g}s "
                    "(its ServerApp has gone?); giving the task up"
                )
        return response

    return pull_object


def run_task(runtime_api_address: str, token: str, object_wait: float = OBJECT_WAIT) -> None:
    """One task, as ``flwr-clientapp`` runs it (pull, call the ClientApp, push), minus the
    FAB install and the process exit; an exception becomes an error reply, as there."""
    client = _runtime_client(
        runtime_api_address,
        RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
        RuntimeTokenHttpInterceptor(token),
    )
    client.PullObject = bounded_pull(client.PullObject, object_wait)  # type: ignore[method-assign]
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
    except MessageGone as gone:
        logger.warning("%s", gone)
    except Exception:  # the SuperNode went away or the task expired: wait for the next one
        logger.exception("ClientApp task could not be pulled or pushed")
    finally:
        try:
            push_task_output(client=client, context=context, sub_status=status, details=details)
        except Exception:  # the run has ended: nothing to report the task to
            logger.exception("ClientApp task output could not be pushed")
        heartbeat.stop()
        client.close()

"""What TensorBoard's HPARAMS tab shows for a logdir, asked of TensorBoard's own backend in-process
(the handlers behind ``/data/plugin/hparams/experiment`` and ``/session_groups``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Session:
    hparams: dict[str, Any]
    metrics: dict[str, float]
    status: int  # api_pb2.Status


@dataclass
class HparamsTab:
    hparam_columns: set[str]
    metric_columns: set[str]
    sessions: dict[str, Session]  # by run name, relative to the logdir


def hparams_tab(logdir: str | Path) -> HparamsTab:
    from google.protobuf import json_format
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import (
        api_pb2,
        backend_context,
        get_experiment,
        list_session_groups,
    )

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
    tb = base_plugin.TBContext(logdir=str(logdir), multiplexer=multiplexer, data_provider=provider)
    backend, request_context = backend_context.Context(tb), context.RequestContext()
    experiment = get_experiment.Handler(
        request_context, backend, "", api_pb2.GetExperimentRequest()
    ).run()
    request = api_pb2.ListSessionGroupsRequest(
        start_index=0, slice_size=10_000, allowed_statuses=list(api_pb2.Status.values())
    )
    for info in experiment.hparam_infos:
        request.col_params.add(hparam=info.name)
    for info in experiment.metric_infos:
        request.col_params.add(metric=info.name)
    groups = list_session_groups.Handler(request_context, backend, "", request).run()
    sessions = {}
    for group in groups.session_groups:
        for session in group.sessions:
            sessions[session.name] = Session(
                hparams={k: json_format.MessageToDict(v) for k, v in group.hparams.items()},
                metrics={m.name.tag: m.value for m in session.metric_values},
                status=session.status,
            )
    return HparamsTab(
        hparam_columns={info.name for info in experiment.hparam_infos},
        metric_columns={info.name.tag for info in experiment.metric_infos},
        sessions=sessions,
    )

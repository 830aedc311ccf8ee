"""The Flower engine: FedMOA's server run-time and clients behind Flower's ServerApp and ClientApp.

Nothing here decides anything about FedMOA: these modules move adapters, replies and
settings in and out of Flower's messages and call the same functions as the embedded
engine. One concern a file:

* :mod:`.records`: the wire format (adapters and replies ↔ Flower records);
* :mod:`.settings`: what the apps read from Flower (run config, node config, environment);
* :mod:`.strategy`: :class:`~.strategy.FedMOAStrategy`, Flower's ``configure_*`` /
  ``aggregate_*`` contract over the run-time;
* :mod:`.roster`: which node runs which client (the discovery query and admission);
* :mod:`.server_app` / :mod:`.client_app`: the two apps (``flwr run`` loads their ``app``);
* :mod:`.node`: what a node builds once and keeps (its client, model, data, rewards, state);
* :mod:`.resident`: a long-lived ClientApp process for a SuperNode;
* :mod:`.simulation`: the Ray simulation launcher; :mod:`.deployment`: a whole deployment
  on one machine, for tests and trying it out.
"""

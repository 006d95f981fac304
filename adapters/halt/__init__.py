"""Durable halt channels: :mod:`adapters.halt.file` (a file on a shared disk) and the
halt document every durable channel stores (:mod:`adapters.halt.document`, also the
Valkey channel's, in :mod:`adapters.valkey`)."""

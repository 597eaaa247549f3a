"""The disaggregated cluster on Ray (`raymoe.actors.cluster.MoECluster`); needs the `serve` (or
`cluster`) extra, and says so in one line when Ray is missing."""

try:
    import ray  # noqa: F401
except ModuleNotFoundError as error:
    from raymoe.extras import missing_extra_message

    raise ModuleNotFoundError(missing_extra_message(error), name=error.name) from None

"""raymoe's own CPU kernels, in C, built on first use (`build`): for work torch has no op for."""

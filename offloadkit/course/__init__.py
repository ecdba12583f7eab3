"""Teaching helpers of the notebooks: the step-by-step versions that the production kernels grew from.

Nothing in the engine imports this package; the notebooks do, so that each chapter's intermediate
versions live in reviewed, linted, tested code rather than only in a notebook cell.
"""

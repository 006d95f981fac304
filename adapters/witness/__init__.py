"""The commit-before-view witness: :mod:`adapters.witness.sqlite` (the
:class:`~kernel.OutputWitness` a service uses), its hash chain (``_chain``) and its group
committer (``_writer``)."""

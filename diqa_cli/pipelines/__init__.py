"""Pipelines: files in, rows out, talking to models only through the contract in
:mod:`diqa_cli.models.base`.

* :mod:`~diqa_cli.pipelines.rows`      the row every pipeline yields (ok and error rows), the
                                       reported score, helpers for nested feature tensors;
* :mod:`~diqa_cli.pipelines.images`    batched image scoring (decoding overlapped with compute);
* :mod:`~diqa_cli.pipelines.videos`    video decoding for a :class:`~diqa_cli.models.base.VideoQualityModel`
                                       and the video scoring loop;
* :mod:`~diqa_cli.pipelines.datasets`  training sets (images, cached features, videos) for ``diqa train``.

Nothing here names a method: what differs between methods is a typed field of its
:class:`~diqa_cli.methods.MethodSpec` or a capability its model declares.
"""

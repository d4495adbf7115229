# UPerNet with an auxiliary FCN head (mmseg's UPerNet recipe, which InternVL's head and full
# tuning inherit): the decode head reads all four backbone maps, the auxiliary head one of them.
norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    type='EncoderDecoder',
    pretrained=None,
    backbone=dict(),
    decode_head=dict(type='UPerHead', in_channels=[64, 64, 64, 64], in_index=[0, 1, 2, 3],
                     pool_scales=(1, 2, 3, 6), channels=32, dropout_ratio=0.1, num_classes=150,
                     norm_cfg=norm_cfg, align_corners=False,
                     loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(type='FCNHead', in_channels=64, in_index=2, channels=32, num_convs=1,
                        concat_input=False, dropout_ratio=0.1, num_classes=150, norm_cfg=norm_cfg,
                        align_corners=False,
                        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False,
                                         loss_weight=0.4)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))

# A linear probe: one FCNHead without convs (InternVL's linear configs replace their base model's
# head by this one).
model = dict(
    type='EncoderDecoder',
    pretrained=None,
    backbone=dict(),
    decode_head=dict(type='FCNHead', in_channels=64, channels=64, num_convs=0, dropout_ratio=0.0,
                     concat_input=False, num_classes=150, with_norm=True, align_corners=False,
                     loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False,
                                      loss_weight=1.0)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))

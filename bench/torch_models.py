"""The PyTorch twins of convpress's benchmark models (LeNet-5, LeNet-300-100, CIFAR
ResNet-20), shared by bench/torch_bench.py and bench/torch_quant.py. Import it after the
thread count is set: importing it imports torch."""
import torch  # noqa: F401
import torch.nn as nn
import torch.nn.functional as F

EXPECTED_PARAMS = {"lenet5": 431_080, "lenet300": 266_610}
NUM_CLASSES = 10


class LeNet5(nn.Module):
    """Caffe's LeNet as used by Deep Compression (no ReLU after the convs)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(800, 500)
        self.fc2 = nn.Linear(500, NUM_CLASSES)

    def forward(self, x):
        x = F.max_pool2d(self.conv1(x), 2, 2)  # 20x24x24 -> 20x12x12
        x = F.max_pool2d(self.conv2(x), 2, 2)  # 50x8x8 -> 50x4x4
        x = torch.flatten(x, 1)                 # 800
        x = F.relu(self.fc1(x))
        return self.fc2(x)


class LeNet300(nn.Module):
    """LeNet-300-100: 784-300-100-10 MLP."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, NUM_CLASSES)

    def forward(self, x):
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:  # option B: projection shortcut
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                nn.BatchNorm2d(cout))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR ResNet-20 (He et al. 2016), 3 stages x 3 BasicBlocks, option B."""

    def __init__(self):
        super().__init__()
        self.conv1 = conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                layers.append(BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, NUM_CLASSES)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def build_model(name):
    model = {"lenet5": LeNet5, "lenet300": LeNet300, "resnet20": ResNet20}[name]()
    n = sum(p.numel() for p in model.parameters())
    if name in EXPECTED_PARAMS:
        assert n == EXPECTED_PARAMS[name], f"{name}: {n} parameters, expected {EXPECTED_PARAMS[name]}"
    return model, n



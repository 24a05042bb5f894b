// SIMT emulator build: the CUDA header cuda_runtime.h resolves here (see ../simt.h).
#pragma once
#include "../simt.h"

// SIMT emulator build: the CUDA header cuda_bf16.h resolves here (see ../simt.h).
#pragma once
#include "../simt.h"

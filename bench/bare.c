/* bare.c: the smallest useful threaded FastCGI responder, used by
 * bench/run.sh as the baseline for remarket's POST /rm/collect.
 * It reads and discards the request body and answers 204 No Content.
 * Usage: bare SOCKET_PATH [THREADS]   (default 4 threads)
 */
#include <fcgiapp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>

static int listen_fd;

static void *worker(void *arg)
{
    FCGX_Request req;
    char buf[8192];
    (void)arg;
    if (FCGX_InitRequest(&req, listen_fd, 0) != 0)
        return NULL;
    while (FCGX_Accept_r(&req) >= 0) {
        while (FCGX_GetStr(buf, (int)sizeof buf, req.in) > 0)
            ; /* discard the body */
        FCGX_PutS("Status: 204 No Content\r\n\r\n", req.out);
        FCGX_Finish_r(&req);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    int i, n = 4;
    pthread_t th[256];

    if (argc < 2 || argc > 3) {
        fprintf(stderr, "usage: %s SOCKET_PATH [THREADS]\n", argv[0]);
        return 2;
    }
    if (argc == 3) {
        n = atoi(argv[2]);
        if (n < 1 || n > 256) {
            fprintf(stderr, "bare: THREADS must be 1..256\n");
            return 2;
        }
    }
    if (FCGX_Init() != 0) {
        fprintf(stderr, "bare: FCGX_Init failed\n");
        return 1;
    }
    listen_fd = FCGX_OpenSocket(argv[1], 128);
    if (listen_fd < 0) {
        fprintf(stderr, "bare: cannot listen on %s\n", argv[1]);
        return 1;
    }
    if (chmod(argv[1], 0666) != 0) {
        perror("bare: chmod");
        return 1;
    }
    for (i = 0; i < n; i++)
        if (pthread_create(&th[i], NULL, worker, NULL) != 0) {
            fprintf(stderr, "bare: pthread_create failed\n");
            return 1;
        }
    for (i = 0; i < n; i++)
        pthread_join(th[i], NULL);
    return 0;
}
